"""benchmarks/context_parallel.py: its closed-form activation formula (docs/design.md §10) is the bytes a
Tokenformer block keeps for backward per rank at CP 2, measured by storage; its counted collectives are the
all-gather of this rank's K, V and the reduce-scatter of their gradient (small sequence, spawned gloo ranks)."""

from megatron_tokenformer import parallel_state
from tests.helpers import dist_pool
from tests.helpers.paths import load_benchmark

SEQ = 256


def _check_block(rank, world):
    bench = load_benchmark("context_parallel")
    with dist_pool.own_model_parallel_groups():
        parallel_state.initialize_model_parallel(1, 1, world)
        result = bench.measure_on_rank(SEQ)
    assert result["retained"] == bench.formula_bytes(SEQ, world), (result["retained"], bench.formula_bytes(SEQ, world))
    h = bench.H
    assert result["log"] == [("all_gather", 2 * SEQ // world * h), ("reduce_scatter", 2 * SEQ * h)]
    return result["retained"]


cp_pool = dist_pool.pool_fixture(2)


def test_formula_and_counted_communication_match_at_cp2(cp_pool):
    retained = cp_pool.run(_check_block)
    assert len(set(retained)) == 1  # the split is balanced: every rank keeps the same bytes
