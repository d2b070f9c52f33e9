"""Checks shared by the operations tests: file hashes of a folder, the error lines of a log, leftover
``.partial`` folders, and processes that must be gone (by pid)."""

from __future__ import annotations

import hashlib
import os
import re
import time
from typing import Dict, Iterable, List

import psutil

ERROR_LINE = re.compile(r"^pretrain_tokenformer\.py: error: ")
RANK_OUTPUT = re.compile(r"^\[rank\d+\]:", re.M)   # how torch prefixes what a rank prints when it dies


def tree_hashes(folder: str, only: Iterable[str] = ()) -> Dict[str, str]:
    """{relative path: sha256} of every file below ``folder`` (or below its entries named in ``only``)."""
    out = {}
    roots = [os.path.join(folder, name) for name in only] if only else [folder]
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                path = os.path.join(dirpath, name)
                with open(path, "rb") as f:
                    out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def step_names(folder: str) -> List[str]:
    return sorted((n for n in os.listdir(folder) if re.fullmatch(r"global_step\d+", n)),
                  key=lambda n: int(n[len("global_step"):]))


def leftovers(folder: str) -> List[str]:
    return [n for n in os.listdir(folder) if n.endswith((".partial", ".old", ".tmp"))]


def latest(folder: str) -> str:
    with open(os.path.join(folder, "latest")) as f:
        return f.read().strip()


def error_lines(text: str) -> List[str]:
    return [line for line in text.splitlines() if ERROR_LINE.match(line)]


def assert_one_error_line(text: str, count: int = 1, torchrun: bool = False) -> str:
    """Exactly ``count`` error lines (one per printing rank), no traceback; returns the first.

    ``torchrun``: the output includes torchrun's own report of a non-zero exit (a ChildFailedError
    traceback of the launcher, not of a rank); no rank may have printed a traceback.
    """
    lines = error_lines(text)
    assert len(lines) == count, f"expected {count} error line(s), got {lines}\n{text[-4000:]}"
    assert not RANK_OUTPUT.search(text), text[-4000:]
    report = "torch.distributed.elastic.multiprocessing.errors.ChildFailedError"
    launcher_reports = text.count(report) if torchrun else 0
    assert text.count("Traceback") == launcher_reports, text[-4000:]
    return lines[0]


def wait_gone(pids: Iterable[int], timeout: float) -> float:
    """Wait until no process of ``pids`` exists (zombies count as gone); returns the seconds waited."""
    start = time.time()
    pids = list(pids)
    while time.time() - start < timeout:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive:
            return time.time() - start
        time.sleep(0.2)
    raise AssertionError(f"processes still running after {timeout} s: {alive}")


def is_rank_process(p: psutil.Process) -> bool:
    """A pretrain_tokenformer.py process that is not a data-loader worker of one (those are forked
    children of a rank, with the same command line and environment)."""
    cmdline = p.cmdline()
    parent = p.parent()  # a forked worker has exactly its rank's command line; a launcher's differs
    return "pretrain_tokenformer.py" in " ".join(cmdline) and not (parent is not None and parent.cmdline() == cmdline)


def rank_processes(launcher_pid: int, n: int, timeout: float = 180) -> List[psutil.Process]:
    """The ``n`` pretrain_tokenformer.py processes below ``launcher_pid``, sorted by RANK."""
    launcher = psutil.Process(launcher_pid)
    deadline = time.time() + timeout
    ranks: List[psutil.Process] = []
    while time.time() < deadline:
        try:
            ranks = [p for p in launcher.children(recursive=True)
                     if is_rank_process(p) and "RANK" in p.environ()]
        except psutil.Error:
            ranks = []
        if len(ranks) == n:
            return sorted(ranks, key=lambda p: int(p.environ()["RANK"]))
        time.sleep(0.3)
    raise AssertionError(f"{len(ranks)} of {n} ranks started")
