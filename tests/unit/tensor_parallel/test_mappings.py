"""tensor_parallel/mappings.py: every autograd collective, forward and backward, against a single-process reference.

Each rank r holds x_r (the same x on every rank where the mapping expects a replicated input) and
an upstream gradient g_r (the same g on every rank where the mapping's output is replicated and
consumed identically). The distributed computation then stands for one global function
L = sum_r <y_r, g_r> of the inputs, which each rank re-computes here in plain torch from ALL ranks'
inputs (no collective) and differentiates with autograd. Inputs are integer-valued float64, so
sums are exact and everything is compared with torch.equal.
"""

import os

import pytest
import torch

from megatron_tokenformer import parallel_state
from megatron_tokenformer.tensor_parallel import mappings
from tests.helpers import dist_pool

SHAPE = (2, 3)  # leading dims; the last (split) dim is C per rank


def ints(*shape, seed):
    return torch.randint(-9, 10, shape, generator=torch.Generator().manual_seed(seed)).double()


def per_rank(world, last, seed):
    """The tensor every rank r holds, [*SHAPE, last], different per rank."""
    return [ints(*SHAPE, last, seed=seed * 100 + r) for r in range(world)]


def leaf(t):
    return t.clone().requires_grad_()


def reference_grads(fn, inputs, upstream):
    """d/d inputs of sum_r <fn(inputs)[r], upstream[r]> (plain torch, one process)."""
    leaves = [leaf(t) for t in inputs]
    outputs = fn(leaves)
    sum((y * g).sum() for y, g in zip(outputs, upstream)).backward()
    return [t.detach() for t in outputs], [t.grad for t in leaves]


def blocks(t, world):
    return list(t.chunk(world, dim=-1))


# --- checks, run on every rank -----------------------------------------------------------------------
def check_copy(rank, world):
    """Identity forward (replicated x); backward all-reduces the per-rank gradients."""
    x, gs = ints(*SHAPE, 4, seed=1), per_rank(world, 4, seed=2)
    outs, (dx,) = reference_grads(lambda xs: [xs[0]] * world, [x], gs)
    xr = leaf(x)
    y = mappings.copy_to_tensor_model_parallel_region(xr)
    y.backward(gs[rank])
    assert torch.equal(y, outs[rank]) and torch.equal(xr.grad, dx)


def check_reduce(rank, world):
    """All-reduce forward of partial sums; the replicated output's gradient passes unchanged."""
    xs, g = per_rank(world, 4, seed=3), ints(*SHAPE, 4, seed=4)
    outs, dxs = reference_grads(lambda xs: [sum(xs)], xs, [g])
    xr = leaf(xs[rank])
    y = mappings.reduce_from_tensor_model_parallel_region(xr)
    y.backward(g)
    assert torch.equal(y, outs[0]) and torch.equal(xr.grad, dxs[rank])


def check_scatter(rank, world):
    """Replicated [.., p*C] -> own block [.., C]; backward all-gathers the blocks' gradients."""
    x, gs = ints(*SHAPE, 3 * world, seed=5), per_rank(world, 3, seed=6)
    outs, (dx,) = reference_grads(lambda xs: blocks(xs[0], world), [x], gs)
    xr = leaf(x)
    y = mappings.scatter_to_tensor_model_parallel_region(xr)
    assert y.shape == SHAPE + (3,)
    y.backward(gs[rank])
    assert torch.equal(y, outs[rank]) and torch.equal(xr.grad, dx)


def check_gather(rank, world, output_grad_is_partial):
    """[.., C] blocks -> [.., p*C] replicated. Backward: own block of the replicated gradient, or,
    when every rank's output gradient is a partial sum, own block of their sum (reduce-scatter)."""
    xs = per_rank(world, 3, seed=7)
    if output_grad_is_partial:
        gs = per_rank(world, 3 * world, seed=8)
        outs, dxs = reference_grads(lambda xs: [torch.cat(xs, dim=-1)] * world, xs, gs)
        g = gs[rank]
    else:
        g = ints(*SHAPE, 3 * world, seed=8)
        outs, dxs = reference_grads(lambda xs: [torch.cat(xs, dim=-1)], xs, [g])
    xr = leaf(xs[rank])
    y = mappings.gather_from_tensor_model_parallel_region(xr, output_grad_is_partial=output_grad_is_partial)
    assert y.shape == SHAPE + (3 * world,)
    y.backward(g)
    assert torch.equal(y, outs[0]) and torch.equal(xr.grad, dxs[rank])


def check_reduce_scatter(rank, world):
    """Partial sums [.., p*C] -> own block of the sum [.., C]; backward all-gathers."""
    xs, gs = per_rank(world, 2 * world, seed=9), per_rank(world, 2, seed=10)
    outs, dxs = reference_grads(lambda xs: blocks(sum(xs), world), xs, gs)
    xr = leaf(xs[rank])
    y = mappings.reduce_scatter_to_tensor_model_parallel_region(xr)
    assert y.shape == SHAPE + (2,)
    y.backward(gs[rank])
    assert torch.equal(y, outs[rank]) and torch.equal(xr.grad, dxs[rank])


def check_all_reduce_norm(rank, world):
    """Sum forward; every rank uses the sum differently, so the backward sums the gradients too
    (an identity backward, as in reduce_from, would give only g_r)."""
    xs, gs = per_rank(world, 4, seed=11), per_rank(world, 4, seed=12)
    outs, dxs = reference_grads(lambda xs: [sum(xs)] * world, xs, gs)
    xr = leaf(xs[rank])
    y = mappings.all_reduce_norm(xr)
    y.backward(gs[rank])
    assert torch.equal(y, outs[rank]) and torch.equal(xr.grad, dxs[rank])
    assert not torch.equal(xr.grad, gs[rank])  # the all-reduce in the backward did happen


def check_all_reduce_max(rank, world):
    xs = per_rank(world, 4, seed=13)
    xr = leaf(xs[rank])
    y = mappings.all_reduce_max_no_grad(xr)
    assert torch.equal(y, torch.stack(xs).amax(dim=0)) and not y.requires_grad


def check_counter(rank, world):
    """Each mapping records (kind, numel handed to the collective on this rank), forward then backward."""
    c = 2
    rep = leaf(ints(*SHAPE, c * world, seed=14))   # replicated [.., p*C]
    part = leaf(ints(*SHAPE, c, seed=15))          # this rank's block [.., C]
    n_full, n_block = rep.numel(), part.numel()
    with mappings.count_collectives() as log:
        mappings.copy_to_tensor_model_parallel_region(rep).sum().backward()
        mappings.reduce_from_tensor_model_parallel_region(rep).sum().backward()
        mappings.scatter_to_tensor_model_parallel_region(rep).sum().backward()
        mappings.gather_from_tensor_model_parallel_region(part).sum().backward()
        mappings.gather_from_tensor_model_parallel_region(part, output_grad_is_partial=True).sum().backward()
        mappings.reduce_scatter_to_tensor_model_parallel_region(rep).sum().backward()
        mappings.all_reduce_norm(part).sum().backward()
        mappings.all_reduce_max_no_grad(part)
    assert log == [("all_reduce", n_full),                                   # copy: backward
                   ("all_reduce", n_full),                                   # reduce: forward
                   ("all_gather", n_block),                                  # scatter: backward
                   ("all_gather", n_block),                                  # gather: forward (split back)
                   ("all_gather", n_block), ("reduce_scatter", n_full),      # gather, partial gradient
                   ("reduce_scatter", n_full), ("all_gather", n_block),      # reduce-scatter
                   ("all_reduce", n_block), ("all_reduce", n_block),         # all_reduce_norm
                   ("all_reduce_max", n_block)], log
    with mappings.count_collectives() as log:  # the counter is off again outside, and reusable
        pass
    assert log == []


def check_bad_last_dim(rank, world):
    odd = ints(*SHAPE, 2 * world + 1, seed=16)
    for fn in (mappings.scatter_to_tensor_model_parallel_region,
               mappings.reduce_scatter_to_tensor_model_parallel_region):
        with pytest.raises(ValueError, match=f"last dimension {2 * world + 1} is not divisible by "
                                             f"tensor-parallel size {world}"):
            fn(odd)


# --- tests -----------------------------------------------------------------------------------------
tp_pool = dist_pool.pool_fixture(2, 4)


def test_copy_to_region(tp_pool):
    tp_pool.run(check_copy)


def test_reduce_from_region(tp_pool):
    tp_pool.run(check_reduce)


def test_scatter_to_region(tp_pool):
    tp_pool.run(check_scatter)


@pytest.mark.parametrize("partial", [False, True], ids=["replicated-grad", "partial-grad"])
def test_gather_from_region(tp_pool, partial):
    tp_pool.run(check_gather, partial)


def test_reduce_scatter_to_region(tp_pool):
    tp_pool.run(check_reduce_scatter)


def test_all_reduce_norm_sums_forward_and_backward(tp_pool):
    tp_pool.run(check_all_reduce_norm)


def test_all_reduce_max_no_grad(tp_pool):
    tp_pool.run(check_all_reduce_max)


def test_collective_counter(tp_pool):
    tp_pool.run(check_counter)


def test_last_dim_not_divisible(tp_pool):
    tp_pool.run(check_bad_last_dim)


# --- one process (no group): every mapping is the identity, the counter still records -------------
def test_single_rank_is_identity_and_still_counted():
    assert not parallel_state.model_parallel_is_initialized()
    x = leaf(ints(*SHAPE, 4, seed=17))
    fns = [mappings.copy_to_tensor_model_parallel_region, mappings.reduce_from_tensor_model_parallel_region,
           mappings.scatter_to_tensor_model_parallel_region, mappings.gather_from_tensor_model_parallel_region,
           mappings.reduce_scatter_to_tensor_model_parallel_region, mappings.all_reduce_norm]
    g = ints(*SHAPE, 4, seed=18)
    with mappings.count_collectives() as log:
        for fn in fns:
            x.grad = None
            y = fn(x)
            y.backward(g)
            assert torch.equal(y, x) and torch.equal(x.grad, g), fn.__name__
        assert torch.equal(mappings.all_reduce_max_no_grad(x), x)
    kinds = [kind for kind, _ in log]
    assert kinds == ["all_reduce", "all_reduce", "all_gather", "all_gather", "reduce_scatter", "all_gather",
                     "all_reduce", "all_reduce", "all_reduce_max"]


def test_counter_refuses_nesting():
    with mappings.count_collectives():
        with pytest.raises(RuntimeError, match="cannot be nested"):
            with mappings.count_collectives():
                pass
    with mappings.count_collectives() as log:  # the failed nesting left the counter usable
        mappings.reduce_from_tensor_model_parallel_region(torch.ones(3))
    assert log == [("all_reduce", 3)]


# --- barrier: a host-side wait on every backend ----------------------------------------------------
def check_barrier_blocks(rank, world, folder):
    """Ranks other than 0 arrive late (a sleep), leaving a file before the barrier; rank 0 must find
    every file once its barrier returns."""
    import time
    if rank != 0:
        time.sleep(0.3 * rank)
        with open(os.path.join(folder, f"arrived{rank}"), "w"):
            pass
    mappings.barrier()
    return sorted(os.listdir(folder))


def test_barrier_blocks_on_gloo(tp_pool, tmp_path):
    results = tp_pool.run(check_barrier_blocks, str(tmp_path))
    world = len(results)
    assert results[0] == [f"arrived{r}" for r in range(1, world)]


def test_barrier_waits_for_the_result_on_the_host(monkeypatch):
    """Under NCCL an all-reduce only enqueues work: the barrier must read its result on the host (what
    synchronises with the stream). A stand-in result records whether the host waited for it."""
    waited = []

    class EnqueuedResult:  # what NCCL's all-reduce hands back: a device tensor not yet computed
        def item(self):
            waited.append(True)
            return 0.0

    monkeypatch.setattr(mappings.dist, "is_available", lambda: True)
    monkeypatch.setattr(mappings.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(mappings, "all_reduce_over", lambda tensor, group="world", op="sum": EnqueuedResult())
    mappings.barrier("data")
    assert waited == [True]
