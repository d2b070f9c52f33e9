"""Check a step folder's files before loading: a truncated or unreadable file is named with its path.

torch checkpoints are zip archives whose central directory is at the end of the file: a truncated
file has none, and ``torch.load`` fails deep inside with "failed finding central directory" and no
file name -- on one rank, while the others wait for it in a collective. :func:`verify_step_files`
(collective) opens every file's directory (JSON files are parsed) before anything is loaded, the
files spread over the ranks; the first problem found, with its path and the rank that found it,
is raised as :class:`CheckpointFileError` on every rank, so all of them end together.
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import List, Optional

__all__ = ["CheckpointFileError", "check_file", "step_files", "verify_step_files"]


class CheckpointFileError(ValueError):
    """A checkpoint file is truncated or unreadable (one-line message with its path)."""


def check_file(path: str) -> Optional[str]:
    """None when ``path`` looks complete; otherwise what is wrong with it (one line, path included)."""
    try:
        size = os.path.getsize(path)
        if path.endswith(".pt"):
            if size == 0:
                return f"{path} is empty (an interrupted write?)"
            if not zipfile.is_zipfile(path):
                return f"{path} is truncated or not a torch checkpoint ({size} bytes, no zip directory at its end)"
            with zipfile.ZipFile(path) as z:
                z.infolist()
        elif path.endswith(".json"):
            with open(path) as f:
                json.load(f)
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        return f"{path} cannot be read: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    return None


def step_files(step_dir: str) -> List[str]:
    out = []
    for root, _, names in os.walk(step_dir):
        out += [os.path.join(root, n) for n in names if n.endswith((".pt", ".json"))]
    return sorted(out)


def verify_step_files(step_dir: str) -> None:
    """Every rank calls this; raises CheckpointFileError on all ranks when any file is broken."""
    import torch.distributed as dist
    initialized = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if initialized else (0, 1)
    problem = None
    for path in step_files(step_dir)[rank::world]:
        problem = check_file(path)
        if problem:
            problem = f"checkpoint file {problem} (found by rank {rank})"
            break
    problems = [problem]
    if initialized and world > 1:
        from megatron_tokenformer.tensor_parallel.mappings import all_gather_objects
        problems = all_gather_objects(problem)
    found = [p for p in problems if p]
    if found:
        raise CheckpointFileError(found[0])
