"""Process groups: layout (pipe, data, model) with model fastest, as DeepSpeed's topology; gloo."""

import os

import pytest
import torch
import torch.distributed as dist

from megatron_tokenformer import parallel_state as ps
from tests.helpers import dist_pool


def expected_coords(rank, tp, pp, dp):
    """Written from the contract: global_rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank."""
    return rank // (dp * tp), (rank // tp) % dp, rank % tp  # pp_rank, dp_rank, tp_rank


def test_without_distributed_everything_is_single_process():
    assert not ps.model_parallel_is_initialized()
    assert ps.get_tensor_model_parallel_world_size() == 1 and ps.get_tensor_model_parallel_rank() == 0
    assert ps.get_pipeline_model_parallel_world_size() == 1 and ps.get_pipeline_model_parallel_rank() == 0
    assert ps.get_data_parallel_world_size() == 1 and ps.get_data_parallel_rank() == 0
    assert ps.get_model_parallel_world_size() == 1 and ps.get_model_parallel_rank() == 0
    assert ps.is_pipeline_first_stage() and ps.is_pipeline_last_stage()
    assert ps.get_tensor_model_parallel_group() is None
    topo = ps.get_topology()
    assert topo.world_size() == 1
    with pytest.raises(RuntimeError, match="torch.distributed"):
        ps.initialize_model_parallel(1, 1)


def test_rank_layout_errors_and_shape():
    with pytest.raises(ValueError, match="world size 6 is not divisible by tensor_model_parallel_size \\(4\\)"):
        ps.rank_layout(6, 4, 1)
    layout = ps.rank_layout(8, 2, 2)
    assert layout["tensor"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout["pipeline"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout["data"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout["model"] == [[0, 1, 4, 5], [2, 3, 6, 7]]


def _check_layout(rank, world, tp, pp):
    dp = world // (tp * pp)
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    pp_rank, dp_rank, tp_rank = expected_coords(rank, tp, pp, dp)
    assert (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
            ps.get_data_parallel_world_size(), ps.get_model_parallel_world_size()) == (tp, pp, dp, tp * pp)
    assert (ps.get_pipeline_model_parallel_rank(), ps.get_data_parallel_rank(),
            ps.get_tensor_model_parallel_rank()) == (pp_rank, dp_rank, tp_rank)
    assert ps.get_tensor_model_parallel_src_rank() == rank - tp_rank
    assert ps.is_pipeline_first_stage() == (pp_rank == 0) and ps.is_pipeline_last_stage() == (pp_rank == pp - 1)
    assert ps.get_model_parallel_rank() == pp_rank * tp + tp_rank

    # each group really contains the ranks the formula says: all-reduce the global ranks over it
    groups = {
        "tensor": (ps.get_tensor_model_parallel_group(), [rank - tp_rank + t for t in range(tp)]),
        "pipeline": (ps.get_pipeline_model_parallel_group(), [p * dp * tp + dp_rank * tp + tp_rank for p in range(pp)]),
        "data": (ps.get_data_parallel_group(), [pp_rank * dp * tp + d * tp + tp_rank for d in range(dp)]),
        "model": (ps.get_model_parallel_group(),
                  [p * dp * tp + dp_rank * tp + t for p in range(pp) for t in range(tp)]),
    }
    for name, (group, members) in groups.items():
        t = torch.tensor([float(rank), 1.0])
        dist.all_reduce(t, group=group)
        assert t.tolist() == [float(sum(members)), float(len(members))], name
    assert ps.get_data_parallel_group_ranks() == groups["data"][1]

    # DeepSpeed's topology agrees (axes pipe, data, model; model fastest)
    topo = ps.get_topology()
    coord = topo.get_coord(rank)
    assert (coord.pipe, coord.data, coord.model) == (pp_rank, dp_rank, tp_rank)
    assert sorted(topo.get_axis_comm_lists("model")) == sorted(ps.rank_layout(world, tp, pp)["tensor"])
    assert sorted(topo.get_axis_comm_lists("data")) == sorted(ps.rank_layout(world, tp, pp)["data"])
    dist.barrier()  # (every rank done with the groups before they are destroyed)
    ps.destroy_model_parallel()
    assert not ps.model_parallel_is_initialized() and ps.get_tensor_model_parallel_world_size() == 1


def check_layout(rank, world, tp, pp):
    with dist_pool.own_model_parallel_groups():
        _check_layout(rank, world, tp, pp)


def check_bad_initialisation(rank, world):
    with dist_pool.own_model_parallel_groups():
        with pytest.raises(ValueError, match="not divisible by tensor_model_parallel_size \\(3\\)"):
            ps.initialize_model_parallel(3, 1)
        ps.initialize_model_parallel(2, 1)
        with pytest.raises(RuntimeError, match="already initialised"):
            ps.initialize_model_parallel(2, 1)


four_ranks = dist_pool.pool_fixture(4)


@pytest.mark.parametrize("tp,pp", [(2, 2), (4, 1), (1, 2), (1, 1)], ids=lambda v: str(v))
def test_groups_on_four_gloo_ranks(four_ranks, tp, pp):
    four_ranks.run(check_layout, tp, pp)


def test_bad_initialisation_on_four_gloo_ranks(four_ranks):
    four_ranks.run(check_bad_initialisation)


def _gloo_loop_threads() -> int:
    """This process's gloo transport threads (one per live gloo group, each waking a hundred times a second)."""
    tasks = "/proc/self/task"
    return sum(open(os.path.join(tasks, t, "comm")).read().strip() == "gloo_tcp_loop" for t in os.listdir(tasks))


def _all_reduce_ones(group) -> float:
    t = torch.ones(1)
    dist.all_reduce(t, group=group)
    return t.item()


def check_destroy_releases_the_groups(rank, world):
    with dist_pool.own_model_parallel_groups():
        before = _gloo_loop_threads()
        for tp, pp in ((2, 1), (1, 2), (4, 1), (2, 2), (2, 1)):
            ps.initialize_model_parallel(tp, pp)
            tensor_group = ps.get_tensor_model_parallel_group()
            sizes = [_all_reduce_ones(tensor_group),  # each group works (and is
                     _all_reduce_ones(ps.get_pipeline_model_parallel_group()),  # fully connected) ...
                     _all_reduce_ones(ps.get_data_parallel_group())]
            assert sizes == [tp, pp, world // (tp * pp)]
            assert _gloo_loop_threads() > before
            dist.barrier()  # ... on every rank before any rank destroys it
            ps.destroy_model_parallel()
            with pytest.raises(ValueError, match="Invalid process group"):  # gone from torch.distributed
                dist.destroy_process_group(tensor_group)
            del tensor_group  # (the last reference: its communicator ends with it)
            assert _gloo_loop_threads() == before, (tp, pp)
        t = torch.ones(1)
        dist.all_reduce(t)  # the world group is untouched
        assert t.item() == world
    return before


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through Linux's /proc")
def test_destroy_releases_the_groups_it_created(four_ranks):
    """Re-initialising with other layouts (as the checks of a rank pool do, hundreds of times) leaves no
    group behind: before, a pool rank ended the suite with ~100 gloo threads, ~10k wake-ups a second."""
    assert all(n >= 1 for n in four_ranks.run(check_destroy_releases_the_groups))
