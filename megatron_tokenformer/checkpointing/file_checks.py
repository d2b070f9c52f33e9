"""Check a step folder's files before anything loads them: one line naming a bad file.

Three checks, on every load path (training ``--load``, every tool through
:class:`~.format.view.CheckpointView`, ``tools/verify_checkpoint.py``), before any reader (ours or
DeepSpeed's ``torch.load``) opens a file:

* structure: torch checkpoints are zip archives whose central directory is at the end of the file: a
  truncated file has none, and ``torch.load`` fails deep inside with "failed finding central
  directory" and no file name. JSON files are parsed.
* code: every ``.pt`` file's pickle is read through the allowlist of :mod:`.format.safe_pickle`
  (tensors, storages, numpy RNG arrays, plain containers, three DeepSpeed records); a file naming any
  other global (``os.system`` in a ``__reduce__``) is refused, nothing of it having run.
* integrity: every file is compared with the size and xxh3-64 hash recorded when it was written
  (:mod:`.format.checksums`); a step written before checksums existed skips this check.

:func:`verify_step_files` (collective) spreads the files and manifests over the ranks; the first
problem found, with its path and the rank that found it, is raised as :class:`CheckpointFileError`
on every rank, so all of them end together. :func:`verify_step` does the same in one process.
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Callable, List, Optional, Tuple

from megatron_tokenformer.checkpointing.format import checksums
from megatron_tokenformer.checkpointing.format.entries import CheckpointFormatError
from megatron_tokenformer.checkpointing.format.files import META_FILE, list_step_dirs, resolve_step_dir
from megatron_tokenformer.checkpointing.format.safe_pickle import UnsafeCheckpointError
from megatron_tokenformer.checkpointing.format.tensor_file import TorchFile

__all__ = ["CheckpointFileError", "check_file", "step_files", "check_step", "verify_step", "verify_step_files",
           "verify_folder"]

# which problem is reported when several are found (a refused pickle names the attack, not its symptom)
_UNSAFE, _STRUCTURE, _CHECKSUM = 0, 1, 2


class CheckpointFileError(CheckpointFormatError):
    """A checkpoint file is truncated, unreadable, names a refused global or fails its checksum (one line)."""

    every_rank_prints = False  # every rank agreed on it (verify_step_files): rank 0 says it


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def _check_file(path: str) -> Optional[Tuple[int, str]]:
    try:
        size = os.path.getsize(path)
        if path.endswith(".pt"):
            if size == 0:
                return _STRUCTURE, f"{path} is empty (an interrupted write?)"
            if not zipfile.is_zipfile(path):
                return _STRUCTURE, (f"{path} is truncated or not a torch checkpoint ({size} bytes, no zip directory "
                                    "at its end)")
            with zipfile.ZipFile(path) as z:
                z.infolist()
            TorchFile(path)  # the pickle through the allowlist (no tensor data is read)
        elif path.endswith(".json"):
            with open(path) as f:
                json.load(f)
    except UnsafeCheckpointError as exc:
        return _UNSAFE, str(exc)
    except (OSError, zipfile.BadZipFile, ValueError, EOFError) as exc:
        return _STRUCTURE, f"{path} cannot be read: {_first_line(exc) if str(exc) else type(exc).__name__}"
    except Exception as exc:  # noqa: BLE001 - a damaged pickle raises anything (UnpicklingError, TypeError...)
        return _STRUCTURE, f"{path} cannot be read: {type(exc).__name__}: {_first_line(exc)}"
    return None


def check_file(path: str) -> Optional[str]:
    """None when ``path`` looks complete and holds only allowed globals; else the problem (one line, path
    included)."""
    found = _check_file(path)
    return found[1] if found else None


def step_files(step_dir: str) -> List[str]:
    out = []
    for root, _, names in os.walk(step_dir):
        out += [os.path.join(root, n) for n in names if n.endswith((".pt", ".json"))]
    return sorted(out)


def _read_meta(step_dir: str):
    try:
        with open(os.path.join(step_dir, META_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None  # reported by the structure check of the file itself


def check_step(step_dir: str, rank: int = 0, world: int = 1) -> Optional[Tuple[int, str]]:
    """This rank's share of the checks of ``step_dir``: (priority, problem) of the first problem, or None."""
    found: List[Tuple[int, str]] = []
    for path in step_files(step_dir)[rank::world]:
        problem = _check_file(path)
        if problem:
            found.append(problem)
            break
    for name in checksums.expected_manifests(step_dir, _read_meta(step_dir))[rank::world]:
        try:
            expected = checksums.read_manifest(step_dir, name)
        except checksums.ChecksumError as exc:
            found.append((_CHECKSUM, str(exc)))
            break
        problem = next((p for p in (checksums.verify_file(step_dir, rel, exp) for rel, exp in sorted(expected.items()))
                        if p), None)
        if problem:
            found.append((_CHECKSUM, problem))
            break
    return min(found) if found else None


def verify_step(step_dir: str) -> None:
    """Every check of ``step_dir`` in this process; raises CheckpointFileError (one line) on a problem."""
    found = check_step(step_dir)
    if found:
        raise CheckpointFileError(f"checkpoint file {found[1]}")


def verify_step_files(step_dir: str) -> None:
    """Every rank calls this; raises CheckpointFileError on all ranks when any file is broken."""
    import torch.distributed as dist
    initialized = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if initialized else (0, 1)
    found = check_step(step_dir, rank, world)
    problem = (found[0], f"checkpoint file {found[1]} (found by rank {rank})") if found else None
    problems = [problem]
    if initialized and world > 1:
        from megatron_tokenformer.tensor_parallel.mappings import all_gather_objects
        problems = all_gather_objects(problem)
    found_all = sorted(p for p in problems if p)
    if found_all:
        raise CheckpointFileError(found_all[0][1])


def verify_folder(load_dir: str, iteration: Optional[int] = None,
                  log: Callable[[str], None] = print) -> List[str]:
    """Check every complete step folder of ``load_dir`` (or only ``global_step<iteration>``; ``load_dir`` may
    also be a step folder itself). Logs one line per step; returns the problems (empty: all good)."""
    if os.path.isfile(os.path.join(load_dir, META_FILE)):
        steps = [os.path.abspath(load_dir)]
    elif iteration is not None:
        steps = [resolve_step_dir(load_dir, iteration)]
    else:
        if not os.path.isdir(load_dir):
            raise FileNotFoundError(f"--load {load_dir}: no such directory")
        steps = [os.path.join(load_dir, name) for _, name in list_step_dirs(load_dir)]
        if not steps:
            raise FileNotFoundError(f"--load {load_dir}: no complete step folder (global_step<N> with {META_FILE})")
    problems = []
    for step in steps:
        found = check_step(step)
        paths = step_files(step)
        nbytes = sum(os.path.getsize(p) for p in paths if os.path.isfile(p))
        if found:
            problems.append(f"checkpoint file {found[1]}")
            log(f"{step}: BAD: checkpoint file {found[1]}")
        elif checksums.expected_manifests(step, _read_meta(step)):
            log(f"{step}: ok ({len(paths)} files, {nbytes / 1e6:.1f} MB: structure, allowed globals, checksums)")
        else:
            log(f"{step}: ok ({len(paths)} files, {nbytes / 1e6:.1f} MB: structure, allowed globals; no checksums "
                "recorded: written before they existed)")
    return problems
