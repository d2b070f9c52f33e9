"""How a run tells its job script whether training is finished (``--exit-status-file``).

A run that stops before ``--train-iters`` (Slurm's time-limit warning SIGUSR1, SIGTERM,
``--exit-duration-in-mins``, ``--exit-interval``) still exits 0 after its save, like Megatron-LM;
so that a batch script can tell "stopped, resume me" from "done" without parsing logs, global rank 0
writes one line to the status file after the last save::

    finished 1000/1000 train-iters
    unfinished 437/1000 signal SIGUSR1

The file is replaced atomically (written beside it, fsynced, then renamed). A run that crashes writes nothing:
job scripts delete the file before starting the run, so a missing file means "failed, do not requeue"
(examples/slurm/*.sbatch requeue the job only on ``unfinished``).
"""

from __future__ import annotations

import os
from typing import Dict, Optional

from megatron_tokenformer.fileio import atomic_write_text

__all__ = ["FINISHED", "UNFINISHED", "status_line", "write_exit_status", "read_exit_status"]

FINISHED = "finished"
UNFINISHED = "unfinished"


def status_line(iteration: int, train_iters: int, reason: str) -> str:
    """``finished I/N reason`` when ``iteration >= train_iters``, else ``unfinished I/N reason``."""
    word = FINISHED if iteration >= train_iters else UNFINISHED
    return f"{word} {iteration}/{train_iters} {reason}".rstrip()


def write_exit_status(path: str, iteration: int, train_iters: int, reason: str) -> str:
    """Atomically replace ``path`` with the status line (call on one rank). Returns the line."""
    line = status_line(iteration, train_iters, reason)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    atomic_write_text(path, line + "\n")
    return line


def read_exit_status(path: str) -> Optional[Dict[str, object]]:
    """``{"finished": bool, "iteration": int, "train_iters": int, "reason": str}``; None without a file."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        parts = f.read().strip().split(" ", 2)
    if len(parts) < 2 or parts[0] not in (FINISHED, UNFINISHED):
        raise ValueError(f"{path}: not an exit status line")
    done, total = (int(v) for v in parts[1].split("/"))
    return {"finished": parts[0] == FINISHED, "iteration": done, "train_iters": total,
            "reason": parts[2] if len(parts) > 2 else ""}
