"""Driving Slurm batch jobs from a test: submit, read a job's fields, wait, find its rank processes,
and pin Slurm's time-limit warning to a known point of a run.

Slurm sends ``--signal`` warnings from slurmctld's time-limit pass (periodic, every 30 s; here a cut
limit was acted on within 1-3 s), so "the warning arrives while the run trains" is a race against the
run's speed and the machine's load. A test
removes the race with :func:`freeze_until_signalled`: it stops the ranks (SIGSTOP) once their
handlers are installed, cuts the time limit so the warning is due, waits until Slurm's signal has
reached every rank, and continues them; the ranks then act on the warning at their next
iteration. Slurm, the signal path, the save and the requeue are all real; only the moment is fixed.

Imported as ``tests.helpers.slurm_jobs``. :class:`SlurmClient` runs the client commands here (the
one-node cluster of ../shared/slurm); tests/helpers/slurm_cluster.py's cluster is one that runs them on
its head node."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Callable, Dict, List, Optional, Sequence

import psutil

ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED", "GONE")


def parse_fields(text: str) -> Dict[str, str]:
    """``scontrol -o show job``'s NAME=VALUE fields (the first of each name)."""
    fields: Dict[str, str] = {}
    for item in text.split():
        if "=" in item:
            name, value = item.split("=", 1)
            fields.setdefault(name, value)
    return fields


def minutes_of(run_time: str) -> int:
    """Whole minutes of a Slurm duration ``[D-][HH:]MM:SS``."""
    days = 0
    if "-" in run_time:
        d, run_time = run_time.split("-", 1)
        days = int(d)
    parts = [int(p) for p in run_time.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    return days * 1440 + parts[0] * 60 + parts[1]


def wait(predicate: Callable[[], bool], timeout: float, what: str, log: Optional[str] = None,
         poll: float = 1.0) -> float:
    """Poll ``predicate`` until true; fails naming ``what`` (and the log's tail). Returns seconds waited."""
    start = time.time()
    while not predicate():
        if time.time() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{read(log)[-4000:] if log else ''}")
        time.sleep(poll)
    return time.time() - start


class SlurmClient:
    """Slurm's client commands against one cluster. This one runs them here, with ``env`` (None: the
    environment's SLURM_CONF, e.g. the one-node cluster of ../shared/slurm); tests/helpers/slurm_cluster.py
    runs them on a simulated host."""

    def __init__(self, env: Optional[Dict[str, str]] = None):
        self._env = env

    def run(self, argv: Sequence[str], timeout: float = 60, env: Optional[Dict[str, str]] = None,
            cwd: Optional[str] = None) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              env=env or self._env, cwd=cwd)

    def sbatch(self, args: Sequence[str], env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None) -> str:
        """``sbatch --parsable ARGS``; the job id."""
        r = self.run(["sbatch", "--parsable", *args], env=env, cwd=cwd)
        assert r.returncode == 0, f"sbatch {' '.join(args)}: {r.stderr.strip()}"
        return r.stdout.strip().split(";")[0]

    def scontrol(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        r = self.run(["scontrol", *args], timeout=30)
        if check and r.returncode != 0:
            raise AssertionError(f"scontrol {' '.join(args)}: {r.stderr.strip()}")
        return r

    def scancel(self, *args: str) -> subprocess.CompletedProcess:
        return self.run(["scancel", *args], timeout=30)

    def job_fields(self, job: str) -> Dict[str, str]:
        """``scontrol show job``'s fields; {"JobState": "GONE"} once the job is purged."""
        r = self.run(["scontrol", "-o", "show", "job", job], timeout=30)
        return parse_fields(r.stdout) if r.returncode == 0 else {"JobState": "GONE"}

    def job_state(self, job: str) -> str:
        return self.job_fields(job).get("JobState", "GONE")

    def wait_ended(self, job: str, timeout: float, log: Optional[str] = None) -> str:
        """Wait until ``job`` is in a final state; that state."""
        wait(lambda: self.job_state(job) in ENDED, timeout, f"job {job} to end", log, poll=2.0)
        return self.job_state(job)

    def release(self, job: str, time_limit_minutes: Optional[int] = None) -> None:
        """Start a requeued job now: Slurm holds a requeued job ~2 minutes (its begin time) before it starts
        again. ``time_limit_minutes`` restores a limit the test cut. Errors (already running) ignored."""
        if time_limit_minutes is not None:
            self.scontrol("update", f"JobId={job}", f"TimeLimit={time_limit_minutes}", check=False)
        self.scontrol("update", f"JobId={job}", "StartTime=now", check=False)

    def cut_time_limit(self, job: str, warn_seconds: int) -> None:
        """Make the job's ``--signal=...@warn_seconds`` warning due now: its time limit becomes the minutes
        it has run plus ceil(warn_seconds / 60) (Slurm's limits are whole minutes)."""
        minutes = minutes_of(self.job_fields(job).get("RunTime", "0:0"))
        self.scontrol("update", f"JobId={job}", f"TimeLimit={minutes + max(1, -(-warn_seconds // 60))}")


def read(path: Optional[str]) -> str:
    if not path or not os.path.exists(path):
        return ""
    with open(path, errors="replace") as f:
        return f.read()


# --------------------------------------------------------------------------- rank processes


def rank_pids(job: str, cluster: Optional[str] = None) -> List[int]:
    """The pretrain_tokenformer.py processes of ``job`` on this machine (every simulated host shares its
    process table), data-loader workers excluded; sorted by RANK. ``cluster``: the job's ClusterName (job
    ids repeat across the clusters one machine may run at once)."""
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
            if cluster is not None and environ.get("SLURM_CLUSTER_NAME") != cluster:
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


def wait_for_handlers(job: str, nranks: int, sig: int, timeout: float, log: Optional[str] = None,
                      cluster: Optional[str] = None) -> List[int]:
    """The ``nranks`` rank pids of ``job``, once every one of them handles ``sig`` (its training loop runs)."""
    pids: List[int] = []

    def ready():
        nonlocal pids
        pids = rank_pids(job, cluster)
        try:
            return len(pids) == nranks and all(catches(pid, sig) for pid in pids)
        except OSError:
            return False

    # a scan reads every process's environment (~25 ms of CPU with a suite running): 4 a second
    wait(ready, timeout, f"{nranks} ranks of job {job} handling signal {sig}", log, poll=0.25)
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
