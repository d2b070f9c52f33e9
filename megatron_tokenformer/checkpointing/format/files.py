"""Checkpoint folder layout and crash-safe publication (the metadata file's schema: :mod:`.metadata`).

A save directory (``--save``) looks like DeepSpeed's::

    latest                          text: the tag of the newest COMPLETE step folder
    global_step<N>/                 one complete step (DeepSpeed files + the files below)
        tokenformer_checkpoint.json project metadata (model config, arguments, layout, samples)
        tokenizer.model             copy of the tokenizer model, when training used one
        tokenformer_rng_rank_<R>.pt every rank's RNG states (python, numpy, torch, TP tracker)
    global_step<N>.partial/         a save in progress (never read; removed by the next save)

Publication protocol (:func:`publish_step_dir`): every file of the step is written into
``global_step<N>.partial``, fsynced, the folder is renamed to ``global_step<N>`` and the parent
fsynced, and only then ``latest`` is replaced (write ``latest.tmp``, fsync, rename, fsync). A process
killed at any moment leaves ``latest`` naming the previous complete step.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import List, Optional, Tuple

from megatron_tokenformer.fileio import atomic_write_text, fsync_dir, swap_dir

LATEST_FILE = "latest"
META_FILE = "tokenformer_checkpoint.json"
TOKENIZER_FILE = "tokenizer.model"
REPORT_FILE = "expansion_report.json"
CANONICAL_DIR = "canonical"
PARTIAL_SUFFIX = ".partial"
STEP_PREFIX = "global_step"

_STEP_RE = re.compile(r"^global_step(\d+)$")


def step_tag(iteration: int) -> str:
    return f"{STEP_PREFIX}{int(iteration)}"


def step_number(name: str) -> Optional[int]:
    """N of a step folder name ``global_step<N>``; None for any other name (``.partial``, ``.old``, ...)."""
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


def rng_file_name(global_rank: int) -> str:
    return f"tokenformer_rng_rank_{int(global_rank):05d}.pt"


# --------------------------------------------------------------------------- publishing and listing
def publish_step_dir(partial_dir: str, final_dir: str, fsync: bool = True) -> None:
    """fsync ``partial_dir`` and rename it to ``final_dir``. The same step saved again (e.g. after
    --finetune) replaces the older folder, moved aside to ``<final_dir>.old`` first (which
    :func:`remove_stale_partials` deletes should a crash leave it)."""
    swap_dir(partial_dir, final_dir, fsync=fsync, aside=final_dir + ".old")


def update_latest(save_dir: str, tag: str) -> None:
    atomic_write_text(os.path.join(save_dir, LATEST_FILE), tag + "\n")


def read_latest(load_dir: str) -> Optional[str]:
    """The tag ``latest`` names, or None when there is no ``latest`` file."""
    path = os.path.join(load_dir, LATEST_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        tag = f.read().strip()
    if not tag:
        raise ValueError(f"{path} is empty; expected the name of a step folder such as global_step100")
    return tag


def list_step_dirs(save_dir: str, complete: bool = True) -> List[Tuple[int, str]]:
    """``(N, name)`` of the step folders ``global_step<N>`` of ``save_dir``, sorted by N: the complete ones
    (with a metadata file), or with ``complete=False`` every folder of that name (the ones another
    program or an interrupted copy left too)."""
    out = []
    if not os.path.isdir(save_dir):
        return out
    for name in os.listdir(save_dir):
        n = step_number(name)
        if n is None:
            continue
        path = os.path.join(save_dir, name)
        if os.path.isfile(os.path.join(path, META_FILE)) if complete else os.path.isdir(path):
            out.append((n, name))
    return sorted(out)


def resolve_step_dir(load_dir: str, iteration: Optional[int] = None) -> Optional[str]:
    """The step folder to load: ``global_step<iteration>`` if given, else the one ``latest`` names.

    Returns None when ``iteration`` is None and there is no ``latest`` (nothing saved yet).
    Raises FileNotFoundError/ValueError naming the path when the folder is missing or incomplete.
    """
    if not os.path.isdir(load_dir):
        if iteration is None:
            return None
        raise FileNotFoundError(f"checkpoint directory {load_dir} does not exist")
    if iteration is not None:
        tag = step_tag(iteration)
        if not os.path.isdir(os.path.join(load_dir, tag)):
            available = ", ".join(str(n) for n, _ in list_step_dirs(load_dir)) or "none"
            raise FileNotFoundError(f"{os.path.join(load_dir, tag)} does not exist "
                                    f"(complete iterations in {load_dir}: {available})")
    else:
        tag = read_latest(load_dir)
        if tag is None:
            return None
    step_dir = os.path.join(load_dir, tag)
    if not os.path.isdir(step_dir):
        raise FileNotFoundError(f"{os.path.join(load_dir, LATEST_FILE)} names {tag}, but {step_dir} does not exist")
    if not os.path.isfile(os.path.join(step_dir, META_FILE)):
        raise ValueError(f"{step_dir} has no {META_FILE}: not a complete megatron_tokenformer checkpoint "
                         "(written by another program, or an interrupted save)")
    return step_dir


def remove_stale_partials(save_dir: str) -> None:
    """Delete what an interrupted save left (rank 0, before a new save): ``*.partial`` / ``*.old`` step
    folders and temporary files of an unfinished ``latest`` update (``latest.tmp*``)."""
    if not os.path.isdir(save_dir):
        return
    for name in os.listdir(save_dir):
        if name.startswith(STEP_PREFIX) and (name.endswith(PARTIAL_SUFFIX) or name.endswith(".old")):
            shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)
        elif name.startswith(LATEST_FILE + ".tmp") and os.path.isfile(os.path.join(save_dir, name)):
            os.remove(os.path.join(save_dir, name))


def prune_checkpoints(save_dir: str, keep_last_n: int) -> List[str]:
    """Delete all but the newest ``keep_last_n`` complete step folders; never the one ``latest`` names.

    Returns the deleted folder names.
    """
    if keep_last_n is None or keep_last_n < 1:
        return []
    latest = read_latest(save_dir)
    steps = list_step_dirs(save_dir)
    return remove_step_dirs(save_dir, [name for _, name in steps[:-keep_last_n] if name != latest])


def remove_step_dirs(save_dir: str, names: List[str]) -> List[str]:
    """Delete the step folders ``names`` of ``save_dir`` (each renamed to ``.old`` first, so a crash
    mid-delete never leaves a half-deleted folder that looks complete); returns ``names``."""
    for name in names:
        path = os.path.join(save_dir, name)
        trash = path + ".old"
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    if names:
        fsync_dir(save_dir)
    return names
