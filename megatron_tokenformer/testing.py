"""Helpers to run a function on several CPU processes joined by a gloo process group (tests, demos)."""

from __future__ import annotations

import datetime
import os
from typing import Callable

from megatron_tokenformer.launch import find_free_port


def _gloo_worker(rank: int, fn: Callable, world_size: int, port: int, args: tuple) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=180))
    try:
        fn(rank, world_size, *args)
    finally:
        from megatron_tokenformer import parallel_state
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def spawn_gloo(fn: Callable, world_size: int, *args) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes with a gloo group.

    ``fn`` must be importable by the children (a module-level function). An exception in any child
    is re-raised here (torch.multiprocessing.ProcessRaisedException with the child's traceback).
    """
    import torch.multiprocessing as mp

    mp.spawn(_gloo_worker, args=(fn, world_size, find_free_port(), args), nprocs=world_size, join=True)
