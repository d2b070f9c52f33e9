"""``--distributed-timeout-minutes``: every collective is bounded, and a timeout names the silent rank.

:func:`set_default_timeout` (before ``deepspeed.init_distributed``) makes the value the timeout of the
world group *and* of every group created afterwards: torch gives ``new_group`` calls without a
timeout its module default (30 minutes), and DeepSpeed creates its pipeline and ZeRO groups that
way, so the default itself is set (``default_pg_timeout`` and ``default_pg_nccl_timeout`` of
``torch.distributed.distributed_c10d``, read by ``new_group`` at call time).

:func:`create_diagnosis_group` (collective, at start-up) makes a spare gloo group. When a collective
fails -- a timeout because a rank stopped (``kill -STOP``, a hung device), or a connection closed
because a peer process died -- :func:`describe_failure` runs ``monitored_barrier`` on that spare
group (the failed group's connections may be broken) with a short timeout; gloo's answer names the
ranks that did not reach it, and the result is one line such as ``rank 1 stopped answering: ...``.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from datetime import timedelta
from typing import Optional

__all__ = ["set_default_timeout", "create_diagnosis_group", "is_collective_failure", "describe_failure"]

_DIAGNOSIS_GROUP = None
_TIMEOUT: Optional[timedelta] = None

_FAILURE_TEXT = re.compile(r"timed out|timeout|connection closed|connection reset|broken pipe|"
                           r"socket|gloo|nccl|peer", re.IGNORECASE)


def set_default_timeout(minutes: float) -> timedelta:
    """Make ``minutes`` the timeout of every process group created from now on. Returns it."""
    global _TIMEOUT
    from torch.distributed import distributed_c10d
    timeout = timedelta(minutes=float(minutes))
    distributed_c10d.default_pg_timeout = timeout
    if hasattr(distributed_c10d, "default_pg_nccl_timeout"):
        distributed_c10d.default_pg_nccl_timeout = timeout
    _TIMEOUT = timeout
    return timeout


def create_diagnosis_group():
    """A gloo group over all ranks kept for :func:`describe_failure` (every rank calls this)."""
    global _DIAGNOSIS_GROUP
    import torch.distributed as dist
    if dist.is_initialized() and dist.get_world_size() > 1:
        _DIAGNOSIS_GROUP = dist.new_group(backend="gloo")
    return _DIAGNOSIS_GROUP


def is_collective_failure(exc: BaseException) -> bool:
    """True for the errors a failed collective raises (timeouts, closed connections)."""
    import torch.distributed as dist
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    return isinstance(exc, RuntimeError) and bool(_FAILURE_TEXT.search(str(exc)))


def _silent_ranks(text: str):
    m = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", text)
    if m:
        return sorted({int(r) for r in re.findall(r"\d+", m.group(1))})
    m = re.search(r"from rank (\d+)", text)
    if m:
        return [int(m.group(1))]
    return []


@contextlib.contextmanager
def _quiet_stderr():
    """Send file descriptor 2 (where torch's C++ logging writes) to /dev/null for the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def describe_failure(exc: BaseException) -> str:
    """One line for a failed collective, naming the rank(s) that stopped answering where gloo can tell."""
    import torch.distributed as dist

    from megatron_tokenformer.tensor_parallel.mappings import monitored_barrier
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    first = re.sub(r"^\[[^\]]*\]\s*", "", first)  # gloo's "[file.cc:123] " prefix
    bound = f"--distributed-timeout-minutes {_TIMEOUT.total_seconds() / 60:g}" if _TIMEOUT else "the timeout"
    me = dist.get_rank() if dist.is_initialized() else 0
    silent, diag_text = [], ""
    if _DIAGNOSIS_GROUP is not None:
        seconds = 30.0 if _TIMEOUT is None else min(30.0, max(2.0, _TIMEOUT.total_seconds()))
        try:
            with _quiet_stderr():  # gloo also logs the answer (two C++ lines): the one line below says it
                monitored_barrier(_DIAGNOSIS_GROUP, timedelta(seconds=seconds), wait_all_ranks=True)
        except RuntimeError as diag:
            silent, diag_text = [r for r in _silent_ranks(str(diag)) if r != me], str(diag)
    from megatron_tokenformer.training import rank_hosts  # [rank_hosts] name the lost host too
    who = rank_hosts.name_lost(silent, f"{exc}\n{diag_text}", me)
    return (f"rank {me}: a collective failed ({first}); {who} stopped answering or ended "
            f"(collectives are bounded by {bound})")
