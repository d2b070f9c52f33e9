"""A persistent pool of spawned CPU ranks joined by one gloo group, for unit tests of collective code.

Spawning ranks and building a gloo group costs seconds per test on a loaded 2-core machine; test
modules instead share one :class:`DistPool` per size (fixture from :func:`pool_fixture`, started on
first use, closed when pytest ends) and run each check as its own pytest test on every rank::

    tp_pool = dist_pool.pool_fixture(2, 4)          # module-level; the tests run once per size

    def _check_x(rank, world, arg):                 # module-level, so the ranks can import it
        ...
        return something_picklable

    def test_x(tp_pool):
        results = tp_pool.run(_check_x, arg)        # [result of rank 0, rank 1, ...]

Guarantees:

- ``run`` returns each rank's result, or raises :class:`RankFailure` (an AssertionError, so pytest
  reports a failed test) with every failing rank's traceback, and which ranks did not answer.
- A failed or timed-out check does not poison the next one: after any failure the ranks are killed
  (one may be stuck in a collective its failed peer never entered) and the next ``run`` starts a
  fresh group. Before each check every rank reseeds the default RNG (``torch.manual_seed(0)``).
- No process outlives the pool: ``close`` (at the end of the pytest session) stops the ranks,
  terminating then killing those that do not exit; a rank also exits by itself when its parent
  process disappears.

The ranks join with a ``file://`` rendezvous in a private temporary directory (no TCP port to race
for), call ``parallel_state.initialize_model_parallel(tensor_model_parallel_size)`` (default: all ranks
in one tensor-parallel group) and use one intra-op thread each.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import multiprocessing
import os
import queue
import shutil
import tempfile
import time
import traceback
from multiprocessing.reduction import ForkingPickler
from typing import Any, Callable, Dict, List, Optional

import pytest

START_TIMEOUT_S = 180.0   # spawning N interpreters that import torch, on a loaded machine
RUN_TIMEOUT_S = 180.0     # default per check
GRACE_S = 5.0             # after a rank fails, how long the others get to report before the kill
COLLECTIVE_TIMEOUT_S = 300


_RANK_TP: Optional[int] = None  # on a rank: the tensor-model-parallel size the pool initialised


@contextlib.contextmanager
def own_model_parallel_groups():
    """Inside a check on a pool rank: drop the pool's model-parallel state for the block (the check
    calls ``initialize_model_parallel`` itself, with any layout) and restore it afterwards."""
    import torch.distributed as dist

    from megatron_tokenformer import parallel_state

    parallel_state.destroy_model_parallel()  # (every rank finished the previous check: no traffic left on them)
    try:
        yield
    finally:
        dist.barrier()  # every rank is done with the check's groups before any rank destroys them
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=_RANK_TP)


class RankFailure(AssertionError):
    """A check failed (or did not finish) on at least one rank; the message holds each rank's story."""


def _rank_main(rank: int, world: int, init_file: str, tp: int, tasks, results, parent_pid: int) -> None:
    """One rank: join the group, then run tasks ``(task_id, fn, args, kwargs)`` until ``None``."""
    import torch
    import torch.distributed as dist

    from megatron_tokenformer import parallel_state

    global _RANK_TP
    _RANK_TP = tp
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the fixture
        results.put((None, rank, False, traceback.format_exc()))
        return
    results.put((None, rank, True, None))
    while True:
        try:
            task = tasks.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent_pid:  # the test process is gone: do not linger
                return
            continue
        if task is None:
            break
        task_id, fn, args, kwargs = task
        torch.manual_seed(0)
        try:
            value = fn(rank, world, *args, **kwargs)
            ForkingPickler.dumps(value)  # fail here, visibly, rather than in the queue's feeder thread
            results.put((task_id, rank, True, value))
        except BaseException:  # noqa: BLE001 - the parent re-raises it as RankFailure
            results.put((task_id, rank, False, traceback.format_exc()))
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


class DistPool:
    """``world_size`` spawned ranks on one gloo group, running module-level check functions on request.

    tensor_model_parallel_size: the TP size the ranks initialise (default: world_size).
    """

    def __init__(self, world_size: int, tensor_model_parallel_size: Optional[int] = None):
        self.world_size = world_size
        self.tensor_model_parallel_size = tensor_model_parallel_size or world_size
        self._ctx = multiprocessing.get_context("spawn")
        self._procs: List[Any] = []
        self._tasks: List[Any] = []
        self._results = None
        self._tmpdir: Optional[str] = None
        self._ids = itertools.count()
        self._last_timeout = 0.0
        self.starts = 0  # how many groups this pool has started (1 unless a check failed)

    # --- lifecycle ---------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return bool(self._procs)

    def start(self) -> None:
        if self.alive:
            return
        self._tmpdir = tempfile.mkdtemp(prefix="dist_pool_")
        init_file = os.path.join(self._tmpdir, "rendezvous")
        self._results = self._ctx.Queue()
        self._tasks = [self._ctx.Queue() for _ in range(self.world_size)]
        self._procs = [self._ctx.Process(target=_rank_main, daemon=True, name=f"dist_pool-rank{r}",
                                         args=(r, self.world_size, init_file, self.tensor_model_parallel_size,
                                               self._tasks[r], self._results, os.getpid()))
                       for r in range(self.world_size)]
        for p in self._procs:
            p.start()
        self.starts += 1
        answers = self._collect(None, START_TIMEOUT_S)
        problems = self._problems(answers)
        if problems:
            self.close(graceful=False)
            raise RankFailure(f"starting {self.world_size} gloo ranks failed:\n" + problems)

    def close(self, graceful: bool = True) -> None:
        """Stop every rank: ask politely (``graceful``), then terminate, then kill. Idempotent."""
        procs, self._procs = self._procs, []
        if graceful:
            for q in self._tasks:
                try:
                    q.put(None)
                except (OSError, ValueError):
                    pass
            deadline = time.monotonic() + 10.0
            for p in procs:
                p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5.0)
            if p.is_alive():
                p.kill()
                p.join(timeout=5.0)
        for q in self._tasks + ([self._results] if self._results is not None else []):
            q.close()
            q.cancel_join_thread()
        self._tasks, self._results = [], None
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> "DistPool":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- running checks ----------------------------------------------------------------------------
    def run(self, fn: Callable, *args, timeout: float = RUN_TIMEOUT_S, **kwargs) -> List[Any]:
        """``fn(rank, world_size, *args, **kwargs)`` on every rank; returns the results by rank.

        ``fn`` must be a module-level function (the ranks import it by name); arguments and results
        must pickle. Raises RankFailure (and restarts the group at the next call) on any failure.
        """
        self.start()
        task_id = next(self._ids)
        for q in self._tasks:
            q.put((task_id, fn, args, kwargs))
        answers = self._collect(task_id, timeout)
        problems = self._problems(answers)
        if problems:
            self.close(graceful=False)  # a peer may be stuck in a collective: the next check gets a fresh group
            raise RankFailure(f"{getattr(fn, '__name__', fn)} failed at world size {self.world_size}:\n"
                              + problems)
        return [answers[r][1] for r in range(self.world_size)]

    def _collect(self, task_id, timeout: float) -> Dict[int, tuple]:
        """Answers {rank: (ok, payload)} for ``task_id`` until all ranks answered, the timeout passed,
        a rank died, or GRACE_S after the first failure."""
        answers: Dict[int, tuple] = {}
        deadline = time.monotonic() + timeout
        while len(answers) < self.world_size:
            now = time.monotonic()
            if now >= deadline:
                break
            try:
                tid, rank, ok, payload = self._results.get(timeout=min(0.5, deadline - now))
            except queue.Empty:
                if any(not p.is_alive() for p in self._procs):
                    deadline = min(deadline, time.monotonic() + GRACE_S)
                continue
            if tid != task_id:
                continue
            answers[rank] = (ok, payload)
            if not ok:
                deadline = min(deadline, time.monotonic() + GRACE_S)
        self._last_timeout = timeout
        return answers

    def _problems(self, answers: Dict[int, tuple]) -> str:
        lines = []
        for rank in range(self.world_size):
            if rank not in answers:
                p = self._procs[rank] if rank < len(self._procs) else None
                if p is not None and not p.is_alive():
                    why = f"process died (exit code {p.exitcode})"
                elif any(not ok for ok, _ in answers.values()):
                    why = "no answer (probably waiting in a collective the failed rank never entered)"
                else:
                    why = f"no answer within {self._last_timeout:g} s"
                lines.append(f"--- rank {rank}: {why}")
            elif not answers[rank][0]:
                lines.append(f"--- rank {rank}:\n{answers[rank][1].rstrip()}")
        return "\n".join(lines)


class SingleProcess:
    """World size 1 without any process group: ``run`` calls the check in this process (rank 0), so
    the same check function also covers TP = 1. The default RNG is reseeded like on the pool's ranks
    and restored afterwards."""

    world_size = 1
    starts = 0

    def start(self) -> None:
        pass

    def close(self, graceful: bool = True) -> None:
        pass

    def run(self, fn: Callable, *args, timeout: float = RUN_TIMEOUT_S, **kwargs) -> List[Any]:
        import torch

        from megatron_tokenformer import parallel_state

        assert not parallel_state.model_parallel_is_initialized(), "the test process must stay single-rank"
        state = torch.get_rng_state()
        torch.manual_seed(0)
        try:
            return [fn(0, 1, *args, **kwargs)]
        finally:
            torch.set_rng_state(state)


_POOLS_KEY = "_tests_helpers_dist_pools"


def _shared_pool(config, world_size: int, tensor_model_parallel_size: Optional[int]) -> DistPool:
    """The session's pool for (world size, TP size), started on first use, closed when pytest ends."""
    pools = getattr(config, _POOLS_KEY, None)
    if pools is None:
        pools = {}
        setattr(config, _POOLS_KEY, pools)

        def close_all():
            for pool in pools.values():
                pool.close()
            pools.clear()

        config.add_cleanup(close_all)
    key = (world_size, tensor_model_parallel_size or world_size)
    if key not in pools:
        pools[key] = DistPool(world_size, tensor_model_parallel_size)
    return pools[key]


def pool_fixture(*world_sizes: int, tensor_model_parallel_size: Optional[int] = None):
    """A module-scoped pytest fixture yielding a started pool, parametrised over ``world_sizes``
    (ids ``tp1``, ``tp2``...; size 1 runs in the test process, see SingleProcess). Assign it to a
    module-level name; that name is the fixture's name.

    Test modules asking for the same size share one pool (one set of ranks for the whole session,
    closed when pytest ends), since starting ranks is most of the cost of a small check.
    """

    @pytest.fixture(scope="module", params=list(world_sizes), ids=[f"tp{w}" for w in world_sizes])
    def _pool(request):
        if request.param == 1:
            return SingleProcess()
        pool = _shared_pool(request.config, request.param, tensor_model_parallel_size)
        pool.start()
        return pool

    return _pool
