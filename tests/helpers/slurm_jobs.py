"""Driving Slurm batch jobs from a test: submit, read a job's fields, wait, find its rank processes,
and pin Slurm's time-limit warning to a known point of a run.

Slurm checks time limits (and sends ``--signal`` warnings) in a periodic pass of slurmctld, about
every 30 s, so "the warning arrives while the run trains" is a race against the run's speed. A test
removes the race with :func:`freeze_until_signalled`: it stops the ranks (SIGSTOP) once their
handlers are installed, cuts the time limit so the warning is due, waits until Slurm's signal is
pending in every rank, and continues them; the ranks then act on the warning at their next
iteration. Slurm, the signal path, the save and the requeue are all real; only the moment is fixed.

Imported as ``tests.helpers.slurm_jobs``; every call takes ``env`` (the cluster's SLURM_CONF) so it
works on any cluster (the one-node cluster of ../shared/slurm or tests/helpers/slurm_cluster.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Callable, Dict, List, Optional, Sequence

import psutil

ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED", "GONE")


def slurm(args: Sequence[str], env: Optional[Dict[str, str]] = None, check: bool = True,
          timeout: float = 60) -> str:
    """Run a Slurm client command (sbatch, scontrol, ...); its stdout."""
    out = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, env=env)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(args)}: exit {out.returncode}: {out.stderr.strip()}")
    return out.stdout


def sbatch(args: Sequence[str], env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None) -> str:
    """``sbatch --parsable ARGS``; the job id."""
    out = subprocess.run(["sbatch", "--parsable"] + list(args), capture_output=True, text=True, timeout=60,
                         env=env, cwd=cwd)
    assert out.returncode == 0, f"sbatch {' '.join(args)}: {out.stderr.strip()}"
    return out.stdout.strip().split(";")[0]


def job_fields(job: str, env: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """``scontrol show job``'s NAME=VALUE fields; {"JobState": "GONE"} once the job is purged."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=30,
                         env=env)
    if out.returncode != 0:
        return {"JobState": "GONE"}
    fields = {}
    for item in out.stdout.split():
        if "=" in item:
            name, value = item.split("=", 1)
            fields.setdefault(name, value)
    return fields


def job_state(job: str, env: Optional[Dict[str, str]] = None) -> str:
    return job_fields(job, env).get("JobState", "GONE")


def wait(predicate: Callable[[], bool], timeout: float, what: str, log: Optional[str] = None,
         poll: float = 1.0) -> float:
    """Poll ``predicate`` until true; fails naming ``what`` (and the log's tail). Returns seconds waited."""
    start = time.time()
    while not predicate():
        if time.time() - start > timeout:
            tail = ""
            if log and os.path.exists(log):
                with open(log, errors="replace") as f:
                    tail = f.read()[-4000:]
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{tail}")
        time.sleep(poll)
    return time.time() - start


def wait_ended(job: str, timeout: float, env: Optional[Dict[str, str]] = None, log: Optional[str] = None) -> str:
    """Wait until ``job`` is in a final state; that state."""
    wait(lambda: job_state(job, env) in ENDED, timeout, f"job {job} to end", log, poll=2.0)
    return job_state(job, env)


def release(job: str, time_limit_minutes: Optional[int] = None, env: Optional[Dict[str, str]] = None) -> None:
    """Start a requeued job now: Slurm holds a requeued job ~2 minutes (its begin time) before it starts
    again. ``time_limit_minutes`` restores the limit a test cut. Errors (job already running) ignored."""
    if time_limit_minutes is not None:
        slurm(["scontrol", "update", f"JobId={job}", f"TimeLimit={time_limit_minutes}"], env, check=False)
    slurm(["scontrol", "update", f"JobId={job}", "StartTime=now"], env, check=False)


def read(path: str) -> str:
    if not os.path.exists(path):
        return ""
    with open(path, errors="replace") as f:
        return f.read()


# --------------------------------------------------------------------------- rank processes


def rank_pids(job: str) -> List[int]:
    """The pretrain_tokenformer.py processes of ``job`` on this machine (every simulated host shares its
    process table), data-loader workers excluded; sorted by RANK."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmdline = p.info["cmdline"] or []
            if not any(part.endswith("pretrain_tokenformer.py") for part in cmdline):
                continue
            environ = p.environ()
            parent = p.parent()
            if environ.get("SLURM_JOB_ID") != job or "SLURM_STEP_ID" not in environ:
                continue
            if parent is not None and parent.cmdline() == cmdline:
                continue  # a forked data-loader worker
            found.append((int(environ.get("SLURM_PROCID", "0")), p.pid))
        except (psutil.Error, OSError):
            continue
    return [pid for _, pid in sorted(found)]


def _signal_mask(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1], 16)
    return 0


def catches(pid: int, sig: int) -> bool:
    """Whether ``pid`` has a handler installed for ``sig``."""
    return bool(_signal_mask(pid, "SigCgt") & (1 << (sig - 1)))


def pending(pid: int, sig: int) -> bool:
    """Whether ``sig`` was sent to ``pid`` and not yet delivered (the process is stopped)."""
    bit = 1 << (sig - 1)
    return bool((_signal_mask(pid, "ShdPnd") | _signal_mask(pid, "SigPnd")) & bit)


def signalled_or_resumed(pid: int, sig: int) -> bool:
    """``sig`` is pending in the stopped ``pid``, or the process runs again (slurmstepd sends SIGCONT
    with the signals it forwards) or has ended."""
    try:
        return pending(pid, sig) or psutil.Process(pid).status() != psutil.STATUS_STOPPED
    except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
        return True


def wait_for_handlers(job: str, nranks: int, sig: int, timeout: float, log: Optional[str] = None) -> List[int]:
    """The ``nranks`` rank pids of ``job``, once every one of them handles ``sig`` (its training loop runs)."""
    pids: List[int] = []

    def ready():
        nonlocal pids
        pids = rank_pids(job)
        try:
            return len(pids) == nranks and all(catches(pid, sig) for pid in pids)
        except OSError:
            return False

    wait(ready, timeout, f"{nranks} ranks of job {job} handling signal {sig}", log, poll=0.05)
    return pids


def freeze_until_signalled(pids: Sequence[int], make_due: Callable[[], None], sig: int, timeout: float,
                           log: Optional[str] = None) -> float:
    """SIGSTOP ``pids``, call ``make_due`` (e.g. cut the job's time limit), wait until ``sig`` reached every
    one of them (pending, or Slurm continued the process with it), SIGCONT them. Returns the seconds
    Slurm took to send ``sig``."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        make_due()
        return wait(lambda: all(signalled_or_resumed(pid, sig) for pid in pids), timeout,
                    f"signal {sig} to reach the stopped ranks {list(pids)}", log, poll=0.2)
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


def run_minutes(job: str, env: Optional[Dict[str, str]] = None) -> int:
    """Whole minutes the job has run (RunTime [D-]HH:MM:SS)."""
    value = job_fields(job, env).get("RunTime", "0:0")
    days = 0
    if "-" in value:
        d, value = value.split("-", 1)
        days = int(d)
    parts = [int(p) for p in value.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    return days * 1440 + parts[0] * 60 + parts[1]


def cut_time_limit(job: str, warn_seconds: int, env: Optional[Dict[str, str]] = None) -> None:
    """Make the job's ``--signal=...@warn_seconds`` warning due now: its time limit becomes the minutes it
    has run plus ceil(warn_seconds / 60) (Slurm's limits are whole minutes)."""
    limit = run_minutes(job, env) + max(1, -(-warn_seconds // 60))
    slurm(["scontrol", "update", f"JobId={job}", f"TimeLimit={limit}"], env)
