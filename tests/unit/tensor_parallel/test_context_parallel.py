"""tensor_parallel/context_parallel.py (the load-balanced causal split) and the context-parallel collectives of
tensor_parallel/mappings.py, against plain single-process references.

The split is checked against its definition written out by hand (rank r keeps chunks r and 2cp-1-r) and
against the causal work it promises to balance; the collectives on spawned gloo ranks (CP 2 and 4) with
integer-valued float64 tensors, so every sum is exact (torch.equal)."""

import pytest
import torch

from megatron_tokenformer import parallel_state
from megatron_tokenformer.tensor_parallel import context_parallel as cpl
from megatron_tokenformer.tensor_parallel import mappings
from tests.helpers import dist_pool


# --- the split (one process) -------------------------------------------------------------------------
@pytest.mark.parametrize("cp,seq", [(2, 8), (4, 16), (2, 12), (4, 8)])
def test_split_is_chunks_r_and_mirror(cp, seq):
    x = torch.arange(seq)[None, :, None].expand(3, seq, 2)  # [b, s, d]: each token carries its position
    c = seq // (2 * cp)
    for r in range(cp):
        expected = list(range(r * c, (r + 1) * c)) + list(range((2 * cp - 1 - r) * c, (2 * cp - r) * c))
        part = cpl.split_for_rank(x, cp, r)
        assert part.shape == (3, seq // cp, 2)
        assert part[0, :, 0].tolist() == expected
        assert cpl.local_positions(seq, cp, r).tolist() == expected
    # every position exactly once over the ranks; the gathered order is the ranks' local orders concatenated
    gathered = cpl.gathered_positions(seq, cp)
    assert sorted(gathered.tolist()) == list(range(seq))
    assert gathered.tolist() == sum((cpl.local_positions(seq, cp, r).tolist() for r in range(cp)), [])


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_merge_inverts_split_on_tokens_labels_mask(cp):
    g = torch.Generator().manual_seed(cp)
    tokens = torch.randint(0, 100, (2, 16), generator=g)
    mask = (torch.rand(2, 16, generator=g) > 0.3).float()
    hidden = torch.randn(2, 16, 5, generator=g)
    for t in (tokens, mask, hidden):
        parts = [cpl.split_for_rank(t, cp, r) for r in range(cp)]
        assert torch.equal(cpl.merge_from_ranks(parts), t)


def test_causal_work_is_balanced():
    """The point of the mirror chunks: every rank's queries see the same number of keys (causal pairs)."""
    for cp, seq in ((2, 16), (4, 32), (8, 64)):
        pairs = [int((cpl.local_positions(seq, cp, r) + 1).sum()) for r in range(cp)]
        assert len(set(pairs)) == 1 and sum(pairs) == seq * (seq + 1) // 2
        naive = [sum(range(r * seq // cp + 1, (r + 1) * seq // cp + 1)) for r in range(cp)]
        assert len(set(naive)) == cp  # a contiguous split would not be balanced


def test_causal_mask_from_global_positions():
    q = cpl.local_positions(8, 2, 0)          # 0 1 6 7
    k = cpl.gathered_positions(8, 2)          # 0 1 6 7 2 3 4 5
    mask = cpl.causal_mask(q, k)
    expected = torch.tensor([[kp <= qp for kp in k.tolist()] for qp in q.tolist()])
    assert torch.equal(mask, expected) and mask.sum() == 1 + 2 + 7 + 8


def test_indivisible_sequence_refused():
    with pytest.raises(ValueError, match=r"sequence length 10 is not divisible by 2 x context-parallel size \(4\) = 8"):
        cpl.split_for_rank(torch.zeros(1, 10), 4, 0)
    with pytest.raises(ValueError, match=r"sequence length 24 is not divisible by 2 x context-parallel size \(2\) x "
                                         r"tensor-parallel size \(4, sequence parallel\) = 16"):
        cpl.check_divisible(24, 2, 4)
    cpl.check_divisible(32, 2, 4)
    with pytest.raises(ValueError, match=r"context-parallel rank 2 outside \[0, 2\)"):
        cpl.rank_chunks(2, 2)


def test_single_process_batch_unchanged():
    assert parallel_state.get_context_parallel_world_size() == 1
    t = torch.arange(6).reshape(1, 6)
    assert cpl.split_batch_on_this_rank(t, t)[0] is t


# --- the collectives (spawned gloo ranks, all in one context-parallel group) --------------------------
def ints(*shape, seed):
    return torch.randint(-9, 10, shape, generator=torch.Generator().manual_seed(seed)).double()


def _check_gather_context(rank, world):
    """All-gather along the sequence over CP; backward: each rank gets the sum over ranks of the gradient of
    its own block (reference: the same function of all ranks' inputs, differentiated in one process)."""
    with dist_pool.own_model_parallel_groups():
        parallel_state.initialize_model_parallel(1, 1, world)
        assert parallel_state.get_context_parallel_world_size() == world
        assert parallel_state.get_context_parallel_rank() == rank
        xs = [ints(2, 3, 4, seed=10 + r) for r in range(world)]       # [b, s_local, d] per rank
        gs = [ints(2, 3 * world, 4, seed=20 + r) for r in range(world)]  # upstream gradient per rank
        leaves = [x.clone().requires_grad_() for x in xs]
        full = torch.cat(leaves, dim=1)
        sum((full * g).sum() for g in gs).backward()
        x = xs[rank].clone().requires_grad_()
        with mappings.count_collectives("context") as log:
            y = mappings.gather_from_context_parallel_region(x, dim=1)
            y.backward(gs[rank])
        assert torch.equal(y, full.detach()) and torch.equal(x.grad, leaves[rank].grad)
        assert log == [("all_gather", x.numel()), ("reduce_scatter", y.numel())]


def _check_loss_reduction(rank, world):
    """Forward: the sum over CP on every rank; backward: the gradient times CP (the DP x CP average of the
    gradients then gives the gradient of the sum)."""
    with dist_pool.own_model_parallel_groups():
        parallel_state.initialize_model_parallel(1, 1, world)
        parts = [ints(1, seed=30 + r) for r in range(world)]
        x = parts[rank].clone().requires_grad_()
        y = mappings.all_reduce_loss_over_context_parallel(x)
        y.backward(torch.full_like(y, 3.0))
        assert torch.equal(y.detach(), sum(parts)) and torch.equal(x.grad, torch.full_like(x, 3.0 * world))
        # the tensor-parallel counter does not see context-parallel collectives
        with mappings.count_collectives() as log:
            mappings.gather_from_context_parallel_region(x.detach()[None], dim=0)
        assert log == []


def _check_groups(rank, world, tp, cp):
    """Each group holds the ranks of the layout tp < cp < dp < pp (all-reduce of the global ranks over it)."""
    import torch.distributed as dist
    with dist_pool.own_model_parallel_groups():
        parallel_state.initialize_model_parallel(tp, 1, cp)
        dp = world // (tp * cp)
        t_rank, c_rank, d_rank = rank % tp, (rank // tp) % cp, rank // (tp * cp)
        assert (parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_context_parallel_rank(),
                parallel_state.get_data_parallel_rank()) == (t_rank, c_rank, d_rank)
        assert parallel_state.get_data_parallel_world_size() == dp
        assert parallel_state.get_data_parallel_world_size(with_context_parallel=True) == dp * cp
        members = {
            "context": [d_rank * cp * tp + c * tp + t_rank for c in range(cp)],
            "data": [d * cp * tp + c_rank * tp + t_rank for d in range(dp)],
            "data_context": [d * cp * tp + c * tp + t_rank for d in range(dp) for c in range(cp)],
        }
        groups = {"context": parallel_state.get_context_parallel_group(),
                  "data": parallel_state.get_data_parallel_group(),
                  "data_context": parallel_state.get_data_parallel_group(with_context_parallel=True)}
        for name, group in groups.items():
            t = torch.tensor([float(rank), 1.0])
            dist.all_reduce(t, group=group)
            assert t.tolist() == [float(sum(members[name])), float(len(members[name]))], name
        # DeepSpeed sees a (pipe, data, model) topology whose data axis is DP x CP
        topo = parallel_state.get_topology()
        assert sorted(topo.get_axis_comm_lists("data")) == sorted(
            parallel_state.rank_layout(world, tp, 1, cp)["data_context"])
        mpu = parallel_state.deepspeed_mpu()
        assert mpu.get_data_parallel_world_size() == dp * cp and mpu.get_data_parallel_rank() == d_rank * cp + c_rank
        assert mpu.get_model_parallel_world_size() == tp and mpu.get_tensor_model_parallel_rank() == t_rank
        return mpu.get_data_parallel_group_ranks()


cp_pool = dist_pool.pool_fixture(2, 4)


def test_gather_from_context_parallel_region(cp_pool):
    cp_pool.run(_check_gather_context)


def test_loss_all_reduce_over_context_parallel(cp_pool):
    cp_pool.run(_check_loss_reduction)


def test_context_parallel_groups(cp_pool):
    world = cp_pool.world_size
    for tp, cp in ((1, world), (1, 2)) if world == 4 else ((1, 2),):
        cp_pool.run(_check_groups, tp, cp)
    if world == 4:
        ranks = cp_pool.run(_check_groups, 2, 2)
        assert ranks == [[0, 2], [1, 3], [0, 2], [1, 3]]


def test_rank_layout_with_context_parallel():
    layout = parallel_state.rank_layout(8, 2, 1, 2)
    assert layout["tensor"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout["context"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout["data"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout["data_context"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert layout["model"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert parallel_state.rank_layout(8, 2, 2, 1) == {**parallel_state.rank_layout(8, 2, 2),
                                                      "context": [[r] for r in range(8)],
                                                      "data_context": parallel_state.rank_layout(8, 2, 2)["data"]}
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by tensor_model_parallel_size \(1\) x "
                                         r"pipeline_model_parallel_size \(1\) x context_parallel_size \(4\) = 4"):
        parallel_state.rank_layout(6, 1, 1, 4)
