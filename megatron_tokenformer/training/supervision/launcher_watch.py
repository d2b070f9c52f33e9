"""Every rank notices the death of its launcher and then saves and exits (never trains unsupervised).

A rank's launcher is the chain of launcher processes above it: ``deepspeed`` (the runner) ->
``python -m deepspeed.launcher.launch`` -> rank; ``torchrun`` -> rank; ``mpirun`` (or ``orted``/
``prted``) -> rank; ``slurmstepd`` -> rank (``srun`` itself runs on the submitting host). SIGTERM to
the ``deepspeed`` runner kills only the runner: the per-node ``launch`` process and the ranks
would go on training, re-parented, with nobody to stop them.

:func:`start` (called once per rank before training) records that chain: the parent and, above it,
every ancestor whose command line is a known launcher; a daemon thread polls it every second. When
the parent changes (``os.getppid()``: the rank was re-parented) or a recorded process has ended (or
its pid was reused: the start time differs), :func:`reason` returns a one-line description, and the
training loop treats it like SIGTERM: all ranks agree, finish the iteration, save, and exit 0.

A polling thread rather than ``prctl(PR_SET_PDEATHSIG)``: the death signal fires when the *thread*
that forked the rank ends (not only the process), and it covers the parent only, not the runner
above the per-node launcher. A run without a launcher (``python pretrain_tokenformer.py``) watches
nothing: a ``nohup`` run must survive the shell that started it.
"""

from __future__ import annotations

import os
import threading
from typing import List, Optional, Tuple

__all__ = ["start", "stop", "reason", "is_launcher", "launcher_chain"]

_LAUNCHER_NAMES = {"deepspeed", "ds", "torchrun", "mpirun", "mpiexec", "orterun", "orted", "prterun", "prted",
                   "prte", "srun", "slurmstepd", "hydra_pmi_proxy", "mpiexec.hydra"}
_LAUNCHER_MODULES = {"deepspeed.launcher.launch", "deepspeed.launcher.runner", "torch.distributed.run",
                     "torch.distributed.launch"}

_reason: Optional[str] = None
_thread: Optional[threading.Thread] = None
_stop = threading.Event()


def is_launcher(cmdline: List[str]) -> bool:
    """True when a process's argv is one of the launchers above (its first three words are looked at)."""
    head = list(cmdline[:3])
    for i, word in enumerate(head):
        if os.path.basename(word).split(":")[0] in _LAUNCHER_NAMES:  # slurmstepd calls itself "slurmstepd: [1.0]"
            return True
        if word == "-m" and i + 1 < len(cmdline) and cmdline[i + 1] in _LAUNCHER_MODULES:
            return True
    return False


def _identity(pid: int) -> Optional[Tuple[int, float, str]]:
    import psutil
    try:
        p = psutil.Process(pid)
        return pid, p.create_time(), " ".join(p.cmdline()[:3])
    except (psutil.Error, OSError):
        return None


def launcher_chain(pid: Optional[int] = None) -> List[Tuple[int, float, str]]:
    """(pid, start time, command) of the parent of ``pid`` (default: this process) and every launcher
    ancestor directly above it; empty when the parent is not a launcher."""
    import psutil
    chain = []
    try:
        proc = psutil.Process(pid or os.getpid()).parent()
        while proc is not None and proc.pid > 1:
            cmdline = proc.cmdline()
            if not is_launcher(cmdline):
                break
            chain.append((proc.pid, proc.create_time(), " ".join(cmdline[:3])))
            proc = proc.parent()
    except (psutil.Error, OSError):
        pass
    return chain


def reason() -> Optional[str]:
    """Why this rank should stop (its launcher ended), or None."""
    return _reason


def _watch(parent: int, chain, interval: float) -> None:
    global _reason
    while not _stop.wait(interval):
        if os.getppid() != parent:
            _reason = f"the launcher ended (parent pid {parent}: {chain[0][2]})"
            return
        for pid, created, command in chain:
            if _identity(pid) is None or _identity(pid)[1] != created:
                _reason = f"the launcher ended (pid {pid}: {command})"
                return


def start(interval: float = 1.0) -> List[Tuple[int, float, str]]:
    """Start watching this rank's launcher chain (no-op without a launcher). Returns the chain."""
    global _thread, _reason
    chain = launcher_chain()
    if not chain or _thread is not None:
        return chain
    _reason = None
    _stop.clear()
    _thread = threading.Thread(target=_watch, args=(os.getppid(), chain, interval), name="launcher-watch",
                               daemon=True)
    _thread.start()
    return chain


def stop() -> None:
    global _thread
    _stop.set()
    if _thread is not None:
        _thread.join(timeout=5)
    _thread = None
