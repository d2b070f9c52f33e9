"""tensor_parallel/random.py: layout-independent parameter init and the RNG states tracker.

References: a torch.Generator seeded with the documented per-parameter seed (sha256 of
"seed/layer/tag", first 8 bytes little-endian, 63 bits), the TP = 1 master tensor sliced by hand,
and torch.manual_seed streams for the tracker's documented seeds (seed; seed + 2718 + tp_rank).
"""

import hashlib

import pytest
import torch
import torch.distributed as dist

from megatron_tokenformer import parallel_state
from megatron_tokenformer.tensor_parallel import random as tp_random
from megatron_tokenformer.tensor_parallel.random import (
    get_cuda_rng_tracker,
    get_rng_tracker,
    init_partitioned_,
    master_normal,
    model_parallel_cuda_manual_seed,
    model_parallel_seed,
    parameter_seed,
    set_tensor_model_parallel_attributes,
)
from tests.helpers import dist_pool


@pytest.fixture(autouse=True)
def keep_rng():
    """These tests reseed the default generator and the tracker: give both back afterwards."""
    state, tracker = torch.get_rng_state(), get_rng_tracker().get_states()
    seeds = set(get_rng_tracker().seeds_)
    yield
    torch.set_rng_state(state)
    get_rng_tracker().set_states(tracker)
    get_rng_tracker().seeds_ = seeds


def draws(seed, n=6):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed))


# --- parameter seeds and master tensors ----------------------------------------------------------
def test_parameter_seed_is_the_documented_hash():
    digest = hashlib.sha256(b"1234/3/attention.query.key_param_tokens").digest()
    assert parameter_seed(1234, 3, "attention.query.key_param_tokens") == \
        int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)
    seeds = {parameter_seed(s, layer, tag) for s in (1, 2) for layer in (0, 1) for tag in ("a", "b")}
    assert len(seeds) == 8 and all(0 <= s < 2 ** 63 for s in seeds)


def test_master_normal_draws_from_the_parameter_generator():
    want = torch.empty(5, 3).normal_(0.0, 0.7, generator=torch.Generator().manual_seed(parameter_seed(9, 2, "w")))
    got = master_normal((5, 3), 0.7, 9, 2, "w")
    assert got.dtype == torch.float32 and torch.equal(got, want)
    torch.manual_seed(0)
    assert torch.equal(master_normal((5, 3), 0.7, 9, 2, "w"), got), "the default generator plays no part"


@pytest.mark.parametrize("partition_dim", [0, 1])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_init_partitioned_is_the_slice_of_the_tp1_master(world, partition_dim):
    full_shape = (8, 12)
    master = init_partitioned_(torch.empty(full_shape), full_shape, 0.3, 5, 1, "t", world_size=1)
    assert torch.equal(master, master_normal(full_shape, 0.3, 5, 1, "t"))
    for rank in range(world):
        shape = list(full_shape)
        shape[partition_dim] //= world
        shard = init_partitioned_(torch.empty(shape), full_shape, 0.3, 5, 1, "t", partition_dim=partition_dim,
                                  rank=rank, world_size=world)
        size = shape[partition_dim]
        assert torch.equal(shard, master.narrow(partition_dim, rank * size, size)), (rank, world)


def test_init_partitioned_padding_rows_are_zero_and_do_not_move_the_rest():
    unpadded = init_partitioned_(torch.empty(11, 4), (11, 4), 0.5, 1, 0, "emb", world_size=1)
    for world in (1, 2, 4):
        padded = torch.cat([init_partitioned_(torch.empty(12 // world, 4), (12, 4), 0.5, 1, 0, "emb",
                                              rank=r, world_size=world, valid_rows=11) for r in range(world)])
        assert torch.equal(padded[:11], unpadded) and torch.equal(padded[11:], torch.zeros(1, 4))


def test_init_partitioned_casts_and_checks_shape():
    master = master_normal((4, 2), 0.1, 0, 0, "x")
    assert torch.equal(init_partitioned_(torch.empty(4, 2, dtype=torch.float64), (4, 2), 0.1, 0, 0, "x",
                                         world_size=1), master.double())
    bf16 = init_partitioned_(torch.empty(2, 2, dtype=torch.bfloat16), (4, 2), 0.1, 0, 0, "x", rank=1, world_size=2)
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, master[2:].bfloat16())
    with pytest.raises(ValueError, match=r"parameter 'x': shard shape \(3, 2\) does not match the slice "
                                         r"\(2, 2\) of master shape \(4, 2\) \(world 2\)"):
        init_partitioned_(torch.empty(3, 2), (4, 2), 0.1, 0, 0, "x", rank=0, world_size=2)


def test_tensor_model_parallel_attributes():
    p = torch.nn.Parameter(torch.empty(2))
    set_tensor_model_parallel_attributes(p, True, 1)
    assert (p.tensor_model_parallel, p.partition_dim, p.partition_stride) == (True, 1, 1)


# --- the tracker, one process ------------------------------------------------------------------
def test_model_parallel_seed_and_fork_streams():
    model_parallel_seed(77)
    a = torch.rand(3)
    with get_rng_tracker().fork():
        f1 = torch.rand(3)
    b = torch.rand(3)
    with get_rng_tracker().fork("model-parallel-rng"):
        f2 = torch.rand(3)
    default, tracked = draws(77), draws(77 + 2718 + 0)
    assert torch.equal(torch.cat([a, b]), default), "the default stream skips what ran inside fork()"
    assert torch.equal(torch.cat([f1, f2]), tracked), "the tracked stream continues from one fork to the next"


def test_fork_restores_the_outer_state_on_error():
    model_parallel_seed(5)
    before = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="boom"):
        with get_rng_tracker().fork():
            torch.rand(4)
            raise RuntimeError("boom")
    assert torch.equal(torch.get_rng_state(), before)
    with get_rng_tracker().fork():  # the state advanced by the failed block is kept
        assert torch.equal(torch.rand(2), draws(5 + 2718, 6)[4:])


def test_tracker_states_round_trip_and_errors():
    tracker = tp_random.RNGStatesTracker()
    tracker.add("a", 10)
    saved = tracker.get_states()
    with tracker.fork("a"):
        first = torch.rand(4)
    tracker.set_states(saved)
    with tracker.fork("a"):
        assert torch.equal(torch.rand(4), first)
    assert torch.equal(first, draws(10, 4))
    with pytest.raises(ValueError, match="seed 10 already exists"):
        tracker.add("b", 10)
    with pytest.raises(ValueError, match="RNG state 'a' already exists"):
        tracker.add("a", 11)
    with pytest.raises(KeyError, match="'nope' is not in the tracker"):
        with tracker.fork("nope"):
            pass
    tracker.reset()
    tracker.add("a", 10)  # reset forgets names and seeds
    assert get_cuda_rng_tracker is get_rng_tracker and model_parallel_cuda_manual_seed is model_parallel_seed


# --- the tracker on a TP group ------------------------------------------------------------------
def check_seeds_per_rank(rank, world):
    model_parallel_seed(123)
    default = torch.rand(6)
    with get_rng_tracker().fork():
        tracked = torch.rand(6)
    after = torch.rand(6)
    # the tracker's default-stream seed is the same on all ranks: check it against a peer too
    gathered = [torch.empty(12) for _ in range(world)]
    dist.all_gather(gathered, torch.cat([default, after]), group=parallel_state.get_tensor_model_parallel_group())
    assert all(torch.equal(t, gathered[rank]) for t in gathered)
    return default, tracked, after


def check_init_on_ranks(rank, world):
    shard = init_partitioned_(torch.empty(8 // world, 3), (8, 3), 0.2, 4, 2, "w")
    return shard


tp_pool = dist_pool.pool_fixture(2, 4)


def test_tracker_seeds_per_tensor_parallel_rank(tp_pool):
    results = tp_pool.run(check_seeds_per_rank)
    for rank, (default, tracked, after) in enumerate(results):
        # the default stream is shared by the ranks and skips what ran inside fork()
        assert torch.equal(torch.cat([default, after]), draws(123, 12)), rank
        assert torch.equal(tracked, draws(123 + 2718 + rank)), rank
    tracked = [t for _, t, _ in results]
    assert all(not torch.equal(tracked[0], t) for t in tracked[1:]), "every rank forks a stream of its own"


def test_init_partitioned_uses_the_tensor_parallel_rank(tp_pool):
    shards = tp_pool.run(check_init_on_ranks)
    assert torch.equal(torch.cat(shards), master_normal((8, 3), 0.2, 4, 2, "w"))
