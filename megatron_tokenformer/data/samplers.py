"""Data-parallel batch samplers that resume at any consumed-sample count (Megatron's).

Global sample order is ``0, 1, 2, ...`` (the datasets shuffle internally). Each step takes
the next ``micro_batch_size * data_parallel_size`` indices; data-parallel rank ``r`` gets
the ``r``-th slice of ``micro_batch_size``. ``consumed_samples`` counts samples over all
ranks, so a run resumed with the checkpoint's count continues with exactly the samples it
has not seen.
"""

from __future__ import annotations

import atexit
import signal
from typing import Iterator, List

__all__ = ["MegatronPretrainingSampler", "build_pretraining_data_loader", "loader_worker_init"]

# Signals a launcher or Slurm sends to the whole process group (SIGTERM from torchrun/srun/scancel,
# SIGINT from Ctrl-C, SIGHUP from a hung-up terminal, SIGUSR1 from --signal=USR1@T): the training
# process acts on them (save, exit); a loader worker must not, or the rank dies with "DataLoader
# worker ... killed by signal" before saving.
_RANK_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)


class MegatronPretrainingSampler:
    """Yields, for this rank, lists of ``micro_batch_size`` dataset indices per step.

    ``total_samples``: samples available (``len(dataset)``); iteration covers
    ``[consumed_samples, total_samples)``. With ``drop_last=False`` a final partial step is
    split as evenly as possible (rank r gets its share, possibly empty lists are skipped).
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int, drop_last: bool = True):
        if total_samples <= 0:
            raise ValueError(f"no sample to consume: total_samples={total_samples}")
        if not 0 <= consumed_samples < total_samples:
            raise ValueError(
                f"consumed_samples={consumed_samples} must be in [0, total_samples={total_samples}): "
                "the run has already consumed all its data"
            )
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be > 0, got {micro_batch_size}")
        if data_parallel_size <= 0 or not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(
                f"data_parallel_rank={data_parallel_rank} must be in [0, data_parallel_size="
                f"{data_parallel_size})"
            )
        self.total_samples = int(total_samples)
        self.consumed_samples = int(consumed_samples)
        self.micro_batch_size = int(micro_batch_size)
        self.data_parallel_rank = int(data_parallel_rank)
        self.data_parallel_size = int(data_parallel_size)
        self.micro_batch_times_data_parallel_size = self.micro_batch_size * self.data_parallel_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        """Number of steps this sampler yields."""
        remaining = self.total_samples - self.consumed_samples
        full = remaining // self.micro_batch_times_data_parallel_size
        if not self.drop_last and remaining % self.micro_batch_times_data_parallel_size:
            tail = self._tail_slice(remaining % self.micro_batch_times_data_parallel_size)
            return full + (1 if tail[1] > tail[0] else 0)
        return full

    def _tail_slice(self, n: int):
        # split n leftover samples over the ranks: rank r gets [start, end)
        per, extra = divmod(n, self.data_parallel_size)
        r = self.data_parallel_rank
        start = r * per + min(r, extra)
        return start, start + per + (1 if r < extra else 0)

    def __iter__(self) -> Iterator[List[int]]:
        step = self.micro_batch_times_data_parallel_size
        lo = self.data_parallel_rank * self.micro_batch_size
        hi = lo + self.micro_batch_size
        idx = self.consumed_samples
        while idx + step <= self.total_samples:
            yield list(range(idx + lo, idx + hi))
            idx += step
        if idx < self.total_samples and not self.drop_last:
            a, b = self._tail_slice(self.total_samples - idx)
            if b > a:
                yield list(range(idx + a, idx + b))


def build_pretraining_data_loader(dataset, consumed_samples: int, micro_batch_size: int,
                                  data_parallel_rank: int, data_parallel_size: int,
                                  num_workers: int = 0, drop_last: bool = True, pin_memory: bool = False):
    """A ``torch.utils.data.DataLoader`` over ``dataset`` driven by the sampler above.

    Batches are ``{"text": LongTensor [micro_batch_size, seq_length + 1]}``. Returns None for
    a None dataset. ``pin_memory``: page-locked batches (only useful, and only asked for, with CUDA).
    """
    if dataset is None:
        return None
    import torch

    sampler = MegatronPretrainingSampler(
        total_samples=len(dataset),
        consumed_samples=consumed_samples,
        micro_batch_size=micro_batch_size,
        data_parallel_rank=data_parallel_rank,
        data_parallel_size=data_parallel_size,
        drop_last=drop_last,
    )
    if num_workers > 0:
        _register_worker_reaper()
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
        persistent_workers=num_workers > 0, worker_init_fn=loader_worker_init if num_workers > 0 else None,
    )


_REAPER_REGISTERED = False


def _register_worker_reaper() -> None:
    """At interpreter exit, multiprocessing stops daemonic children with SIGTERM -- which loader workers
    ignore (:func:`loader_worker_init`) -- and then waits for them. Registered after multiprocessing's own
    exit hook, this one runs first and ends them with SIGKILL (they hold no state; a persistent iterator
    still alive at exit would otherwise keep the rank waiting forever)."""
    global _REAPER_REGISTERED
    if not _REAPER_REGISTERED:
        import multiprocessing.util  # noqa: F401  (its exit hook is registered first, so it runs after ours)
        atexit.register(_kill_daemonic_children)
        _REAPER_REGISTERED = True


def _kill_daemonic_children() -> None:
    import multiprocessing
    children = [child for child in multiprocessing.active_children() if child.daemon]
    if not children:
        return
    # torch's SIGCHLD handler would report the killed workers as a failure (a traceback at exit)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()
    for child in children:
        child.join(timeout=10)


def loader_worker_init(worker_id: int) -> None:
    """In each loader worker: leave the launcher's signals to the training process (which saves and
    exits; the workers end with it -- torch's workers also stop when their parent is gone)."""
    for sig in _RANK_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
