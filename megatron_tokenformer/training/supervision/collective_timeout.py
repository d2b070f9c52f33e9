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

What the diagnosis can and cannot tell (:func:`blame`): gloo's monitored barrier is led by rank 0, which
learns every rank that did not arrive; any other rank learns only about rank 0. A rank whose collective
failed alone (the others are healthy, elsewhere) would see *every* other rank missing: then the line
says so instead of naming them all. Ranks are named where the answer can be right: a strict subset of
the others missing, or the one other rank of a two-rank run.

The diagnosis group is created with gloo's lazy connections (``TORCH_GLOO_LAZY_INIT``), so it is not a
full mesh (O(N^2) connections, slow to set up at 1,000+ ranks); one monitored barrier at start-up opens
the only connections the diagnosis uses, rank 0 to each other rank (N - 1 in all). Opening them at
diagnosis time instead would stall on a stopped peer for longer than the diagnosis wait.

Under NCCL, :func:`nccl_environment` sets torch's NCCL variables (unless the user set them) before the
process group exists: ``TORCH_NCCL_ASYNC_ERROR_HANDLING=2`` (on a timeout the watchdog aborts the
communicators and the error reaches Python, where this module's line is printed; torch's default tears
the process down from the watchdog thread first), and the flight recorder (``TORCH_NCCL_TRACE_BUFFER_SIZE``,
``TORCH_NCCL_DUMP_ON_TIMEOUT``, ``TORCH_NCCL_ENABLE_MONITORING``) dumping each rank's last collectives to
``<run folder>/nccl_flight_recorder/rank_<N>`` (``TORCH_NCCL_DEBUG_INFO_TEMP_FILE`` and its newer name
``TORCH_FR_DUMP_TEMP_FILE``). Names as in torch 2.13's ProcessGroupNCCL.hpp / FlightRecorder.hpp.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sys
import threading
import time
from datetime import timedelta
from typing import Dict, Optional, Sequence

from megatron_tokenformer.training import rank_hosts

__all__ = ["set_default_timeout", "create_diagnosis_group", "is_collective_failure", "describe_failure",
           "nccl_environment", "apply_nccl_environment", "blame", "diagnosis_wait_seconds", "FLIGHT_RECORDER_DIR"]

_DIAGNOSIS_GROUP = None
_TIMEOUT: Optional[timedelta] = None

#: what a failed collective says (gloo, NCCL's watchdog, the c10d store), phrase by phrase; never a bare
#: "nccl" or "socket" (a CUDA/NCCL set-up error or an unrelated socket error is not a collective failure)
_FAILURE_TEXT = re.compile("|".join([
    r"timed out waiting \d+ ?ms for (recv|send) operation",          # gloo
    r"connection (closed|reset) by peer", r"broken pipe",              # a peer process died
    r"application timeout caused pair closure",                        # gloo
    r"failed to pass monitoredBarrier",
    r"watchdog caught collective operation timeout",                   # NCCL's watchdog
    r"NCCL communicator was aborted", r"ncclRemoteError", r"ncclSystemError",
    r"^\[[^\]]*gloo/[^\]]*\.(cc|h):\d+\]",                            # an error raised inside gloo
    r"socket timeout", r"failed to recv, got 0 bytes",                 # the c10d store lost its peer
]), re.IGNORECASE)

#: under the run folder: NCCL's flight-recorder dumps (one file per rank)
FLIGHT_RECORDER_DIR = "nccl_flight_recorder"


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


def nccl_environment(backend: str, run_dir: Optional[str], environ: Dict[str, str]) -> Dict[str, str]:
    """The torch NCCL variables to add to ``environ`` for a run on ``backend`` (nothing unless "nccl";
    a variable the user set is kept). ``run_dir``: where the flight recorder dumps (None: torch's default
    place, /tmp)."""
    if backend != "nccl":
        return {}
    wanted = {
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "2",   # CleanUpOnly: abort the communicators, raise in Python
        "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",   # flight recorder on (entries per rank)
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_NCCL_ENABLE_MONITORING": "1",      # (the dump needs the monitoring thread)
    }
    if run_dir:
        prefix = os.path.join(os.path.abspath(run_dir), FLIGHT_RECORDER_DIR, "rank_")
        wanted["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] = prefix
        wanted["TORCH_FR_DUMP_TEMP_FILE"] = prefix
    if "NCCL_ASYNC_ERROR_HANDLING" in environ:  # torch's older name, still read: the user's setting wins
        wanted.pop("TORCH_NCCL_ASYNC_ERROR_HANDLING")
    return {k: v for k, v in wanted.items() if k not in environ}


def apply_nccl_environment(backend: str, run_dir: Optional[str], environ=None) -> Dict[str, str]:
    """Set :func:`nccl_environment` in ``environ`` (default ``os.environ``; before the process group
    exists) and create the dump folder. Returns what was set."""
    environ = os.environ if environ is None else environ
    added = nccl_environment(backend, run_dir, environ)
    dump = added.get("TORCH_NCCL_DEBUG_INFO_TEMP_FILE")
    if dump:
        try:
            os.makedirs(os.path.dirname(dump), exist_ok=True)
        except OSError:  # no dump folder: torch's default place instead
            for key in ("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", "TORCH_FR_DUMP_TEMP_FILE"):
                added.pop(key, None)
    environ.update(added)
    return added


@contextlib.contextmanager
def _gloo_lazy_connections():
    saved = os.environ.get("TORCH_GLOO_LAZY_INIT")
    os.environ["TORCH_GLOO_LAZY_INIT"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TORCH_GLOO_LAZY_INIT", None)
        else:
            os.environ["TORCH_GLOO_LAZY_INIT"] = saved


def create_diagnosis_group():
    """A gloo group over all ranks kept for :func:`describe_failure` (every rank calls this). It is a star,
    not a full mesh: created with lazy connections, then one monitored barrier opens rank 0's connection to
    every other rank (N - 1 in all, module docstring)."""
    global _DIAGNOSIS_GROUP
    import torch.distributed as dist
    if dist.is_initialized() and dist.get_world_size() > 1:
        with _gloo_lazy_connections():
            _DIAGNOSIS_GROUP = dist.new_group(backend="gloo")
        # open now exactly the connections the diagnosis uses (rank 0 <-> every rank): a connection first
        # attempted at diagnosis time to a stopped peer would outlast the diagnosis wait
        from megatron_tokenformer.tensor_parallel.mappings import monitored_barrier
        monitored_barrier(_DIAGNOSIS_GROUP, _TIMEOUT or timedelta(minutes=30), wait_all_ranks=True)
        try:
            publish_rank_identity(_default_store(), dist.get_rank())
        except Exception:  # noqa: BLE001 - a store without set: the line names ranks only
            pass
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


def diagnosis_wait_seconds(timeout: Optional[timedelta]) -> float:
    """How long the diagnosis barrier waits for the other ranks: half the collective timeout, at least
    5 s (ranks notice one failure at slightly different times), at most 30 s. A stopped rank therefore
    ends the run within ``T + min(30, max(5, T / 2))`` seconds plus the launcher's grace (docs/training.md)."""
    if timeout is None:
        return 30.0
    return min(30.0, max(5.0, timeout.total_seconds() / 2))


_UNNAMED = "another rank stopped answering or ended"


def blame(silent: Sequence[int], me: int, world: int, waited: float) -> str:
    """The words for the ranks the diagnosis barrier says did not arrive (``silent``, ``me`` excluded):
    named where that can be right (module docstring), else said as what it is."""
    silent = sorted(r for r in set(silent) if r != me)
    if not silent:
        return _UNNAMED
    others = world - 1
    if len(silent) < others or world == 2:
        # "rank 1", or on a multi-host job "ranks 2, 3 (host b)" (the table gathered at start-up)
        return f"{rank_hosts.describe_ranks(silent)} stopped answering or ended"
    return (f"none of the other {others} ranks answered within {waited:g} s (they all stopped, or this rank "
            f"alone is out of step with them)")


# --- who the silent ranks are: host and pid (published at start), and what this host sees of them ------
_STORE_PREFIX = "megatron_tokenformer/diagnosis/"
_NAMED_AT_MOST = 8  # ranks looked up in the store for one line


def _default_store():
    try:
        from torch.distributed import distributed_c10d
        return distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no store: the line names ranks only
        return None


def publish_rank_identity(store, rank: int) -> None:
    """Every rank writes ``"<host> <pid>"`` under its rank in the rendezvous store and adds ``"rank:pid,"``
    to its host's list (two store operations per rank, O(1))."""
    if store is not None:
        host = socket.gethostname()
        store.set(f"{_STORE_PREFIX}rank/{rank}", f"{host} {os.getpid()}")
        store.append(f"{_STORE_PREFIX}host/{host}", f"{rank}:{os.getpid()},")


def ended_local_ranks(store, me: int, proc_root: str = "/proc") -> Dict[int, str]:
    """The ranks on this host (from its list in the store) whose process is not running (ended or stopped):
    ``{rank: "pid P on this host, <process_status>"}``. A killed rank cannot say it died; its neighbours
    can see it."""
    out: Dict[int, str] = {}
    if store is None:
        return out
    try:
        listing = store.get(f"{_STORE_PREFIX}host/{socket.gethostname()}").decode()
    except Exception:  # noqa: BLE001 - the store may be gone with the failed rank
        return out
    for item in filter(None, listing.split(",")):
        rank, pid = (int(x) for x in item.split(":"))
        status = process_status(pid, proc_root) if rank != me else "running"
        if status != "running":
            out[rank] = f"pid {pid} on this host, {status}"
    return out


def process_status(pid: int, proc_root: str = "/proc") -> str:
    """What this host sees of process ``pid``: ``"ended"`` (gone; its launcher collected the exit status),
    ``"ended: killed by SIGKILL"`` / ``"ended: exit status 1"`` (a zombie not yet collected: the status is
    still readable), ``"stopped (SIGSTOP or SIGTSTP)"``, or ``"running"``."""
    try:
        with open(os.path.join(proc_root, str(pid), "stat")) as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return "ended"
    except OSError:
        return "running"
    fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) ": state is field 3 of stat
    state = fields[0] if fields else "?"
    if state in ("Z", "X"):
        try:
            code = int(fields[49])  # field 52: exit_code, in waitpid() form
        except (IndexError, ValueError):
            return "ended"
        if code & 0x7F:
            try:
                name = signal.Signals(code & 0x7F).name
            except ValueError:
                name = f"signal {code & 0x7F}"
            return f"ended: killed by {name}"
        return f"ended: exit status {(code >> 8) & 0xFF}"
    if state in ("T", "t"):
        return "stopped (SIGSTOP or SIGTSTP)"
    return "running"


def describe_ranks(store, ranks: Sequence[int], proc_root: str = "/proc") -> Dict[int, str]:
    """``{rank: "pid P on this host, <process_status>"`` or ``"pid P on host H"``} for up to
    :data:`_NAMED_AT_MOST` of ``ranks`` whose identity is in ``store``."""
    out: Dict[int, str] = {}
    if store is None:
        return out
    here = socket.gethostname()
    for rank in list(ranks)[:_NAMED_AT_MOST]:
        try:
            host, pid = store.get(f"{_STORE_PREFIX}rank/{rank}").decode().split()
        except Exception:  # noqa: BLE001 - the store itself may be gone with the failed rank
            continue
        out[rank] = (f"pid {pid} on this host, {process_status(int(pid), proc_root)}" if host == here else
                     f"pid {pid} on host {host}")
    return out


class _DeadlineStore:
    """The rendezvous store during one diagnosis: every operation bounded by what is left of ``seconds``;
    after one failed or unanswered operation (the store's host lost or cut off) none is tried any more, so
    a diagnosis never waits on the store longer than ``seconds``. Each operation runs on a daemon thread:
    the store's own timeout (the run's, minutes) does not bound a reply that never comes over a cut link
    (a blocking receive, no reset), so the caller stops waiting and leaves the thread behind."""

    def __init__(self, store, seconds: float):
        self._store = store
        self._deadline = time.monotonic() + seconds
        self._failed = False

    def __getattr__(self, name):
        op = getattr(self._store, name)

        def bounded(*args, **kwargs):
            left = self._deadline - time.monotonic()
            if self._failed or left <= 0:
                raise RuntimeError("the rendezvous store did not answer in time")
            outcome = {}

            def call():
                try:
                    outcome["value"] = op(*args, **kwargs)
                except Exception as exc:  # noqa: BLE001 - handed to the caller below
                    outcome["error"] = exc

            worker = threading.Thread(target=call, name="diagnosis-store", daemon=True)
            worker.start()
            worker.join(left)
            if worker.is_alive() or "error" in outcome:
                self._failed = True
                raise outcome.get("error") or RuntimeError("the rendezvous store did not answer in time")
            return outcome.get("value")
        return bounded


def _share_verdict(store, me: int, verdict: str, seconds: float) -> Optional[str]:
    """Rank 0 (the only rank gloo's monitored barrier tells who is missing) publishes ``verdict``; the other
    ranks wait for it at most ``seconds`` and return it (None when it does not come: rank 0 or the store
    is gone, and the caller keeps its own view)."""
    if store is None:
        return None
    key = f"{_STORE_PREFIX}verdict"
    try:
        if me == 0:
            store.set(key, verdict)
            return verdict
        store.wait([key], timedelta(seconds=seconds))
        return store.get(key).decode()
    except Exception:  # noqa: BLE001 - rank 0 or the store is gone: this rank's own view
        return None


def _ended_ranks(store, me: int) -> Dict[int, str]:
    """The ranks found not running on this host, plus (on rank 0) what every other host reported; each rank
    adds its host's findings to one store key (a dead neighbour is certain, whatever gloo said)."""
    ended = ended_local_ranks(store, me)
    if store is None:
        return ended
    key = f"{_STORE_PREFIX}ended"
    try:
        if ended:
            store.append(key, "".join(f"{r}={d};" for r, d in ended.items()))
        if me == 0 and store.check([key]):
            for item in filter(None, store.get(key).decode().split(";")):
                rank, detail = item.split("=", 1)
                ended.setdefault(int(rank), detail)
    except Exception:  # noqa: BLE001 - the store may be gone with the failed rank
        pass
    return ended


def _name_silent_ranks(store, silent: Sequence[int], me: int, world: int, seconds: float) -> str:
    """:func:`blame`'s words for the silent ranks (those gloo named plus those found ended), each named rank
    prefixed with its host/pid/state where known: ``rank 1 = pid 4242 on this host, ended: killed by SIGKILL;
    rank 1 stopped answering or ended``."""
    ended = _ended_ranks(store, me)
    silent = sorted(set(silent) | set(ended))
    named = blame(silent, me, world, seconds)
    if silent and "stopped answering" in named:
        details = describe_ranks(store, sorted(set(silent) - {me} - set(ended)))
        details.update(ended)
        if details:
            named = "; ".join(f"rank {r} = {details[r]}" for r in sorted(details)) + "; " + named
    return named


def describe_failure(exc: BaseException) -> str:
    """One line for a failed collective, naming the rank(s) that stopped answering where gloo can tell."""
    import torch.distributed as dist

    from megatron_tokenformer.tensor_parallel.mappings import monitored_barrier
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    first = re.sub(r"^\[[^\]]*\]\s*", "", first)  # gloo's "[file.cc:123] " prefix
    bound = f"--distributed-timeout-minutes {_TIMEOUT.total_seconds() / 60:g}" if _TIMEOUT else "the timeout"
    me = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    silent, diag_text = [], ""
    seconds = diagnosis_wait_seconds(_TIMEOUT)
    if _DIAGNOSIS_GROUP is not None:
        try:
            with _quiet_stderr():  # gloo also logs the answer (two C++ lines): the one line below says it
                monitored_barrier(_DIAGNOSIS_GROUP, timedelta(seconds=seconds), wait_all_ranks=True)
        except RuntimeError as diag:
            silent, diag_text = [r for r in _silent_ranks(str(diag)) if r != me], str(diag)
    store = _default_store()
    if store is not None:
        store = _DeadlineStore(store, seconds)
    named = _name_silent_ranks(store, silent, me, world, seconds)
    if named.startswith(_UNNAMED):  # no rank named: the host whose address the error quotes as the peer
        named = rank_hosts.name_lost([], f"{exc}\n{diag_text}", me) + named[len("another rank"):]
    # rank 0's view is the only one naming ranks other than rank 0 (the others' barrier fails waiting for rank 0
    # whenever anyone is missing): every rank prints rank 0's words when they come
    shared = _share_verdict(store, me, named, seconds) if world > 1 else None
    if shared is not None:
        named = shared
    return (f"rank {me}: a collective failed ({first}); {named} "
            f"(collectives are bounded by {bound})")
