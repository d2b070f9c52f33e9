"""tensor_parallel/layers.py against nn.Linear / nn.Embedding / a plain matmul, at TP 1 (this process), 2 and 4.

On every rank the full weight is rebuilt by all-gathering the shards with torch.distributed directly
(tests/helpers/tp_gather.py, not through the code under test); the reference module is then a plain torch layer
with that weight,
run on the full input in float64. The parallel layer's output must be the rank's part of the reference
output, its parameter gradients the rank's slices of the reference gradients, and the input gradient
the reference input gradient (sums over ranks happen inside the layer). Upstream gradients are the
same on every rank when the output is replicated, so the loss is counted once. The gathered weights
must be exactly the TP = 1 layer's (built in the test process): initialisation does not depend on the layout.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megatron_tokenformer.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    linear_from_sequence_parallel_region,
    parallel_lm_logits,
)
from tests.helpers import dist_pool
from tests.helpers.tp_gather import full_tensor

F64 = torch.float64
TOL = dict(rtol=1e-12, atol=1e-12)


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def part(t, dim, rank, world):
    return t.chunk(world, dim=dim)[rank]


def column(gather_output=False):
    return ColumnParallelLinear(8, 12, gather_output=gather_output, init_std=0.5, seed=3, tag="c", params_dtype=F64)


def row_layer(input_is_parallel=True):
    return RowParallelLinear(12, 6, input_is_parallel=input_is_parallel, init_std=0.5, seed=3, tag="r",
                             params_dtype=F64)


def embedding():
    return VocabParallelEmbedding(12, 4, vocab_size=11, init_std=0.5, seed=3, tag="e", params_dtype=F64)


def check_column(rank, world, gather_output):
    col = column(gather_output)
    assert col.weight.shape == (12 // world, 8) and col.bias.shape == (12 // world,)
    assert col.weight.partition_dim == 0 and col.bias.tensor_model_parallel
    with torch.no_grad():
        col.bias.copy_(part(randn(12, seed=1), 0, rank, world))
    ref = nn.Linear(8, 12, dtype=F64)
    with torch.no_grad():
        ref.weight.copy_(full_tensor(col.weight, 0, world))
        ref.bias.copy_(randn(12, seed=1))
    x, g = randn(2, 5, 8, seed=2), randn(2, 5, 12, seed=4)
    xr, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref = ref(xr)
    out_ref.backward(g)
    out = col(xp)
    if gather_output:
        torch.testing.assert_close(out, out_ref.detach(), **TOL)
        out.backward(g)
    else:
        torch.testing.assert_close(out, part(out_ref.detach(), -1, rank, world), **TOL)
        out.backward(part(g, -1, rank, world))
    torch.testing.assert_close(col.weight.grad, part(ref.weight.grad, 0, rank, world), **TOL)
    torch.testing.assert_close(col.bias.grad, part(ref.bias.grad, 0, rank, world), **TOL)
    torch.testing.assert_close(xp.grad, xr.grad, **TOL)
    return ref.weight.detach()


def check_row(rank, world, input_is_parallel):
    row = row_layer(input_is_parallel)
    assert row.weight.shape == (6, 12 // world) and row.bias.shape == (6,)
    assert row.weight.partition_dim == 1 and not row.bias.tensor_model_parallel
    with torch.no_grad():
        row.bias.copy_(randn(6, seed=1))
    ref = nn.Linear(12, 6, dtype=F64)
    with torch.no_grad():
        ref.weight.copy_(full_tensor(row.weight, 1, world))
        ref.bias.copy_(randn(6, seed=1))
    x, g = randn(2, 5, 12, seed=2), randn(2, 5, 6, seed=4)
    xr = x.clone().requires_grad_()
    out_ref = ref(xr)
    out_ref.backward(g)
    xp = (x if not input_is_parallel else part(x, -1, rank, world)).clone().requires_grad_()
    out = row(xp)
    torch.testing.assert_close(out, out_ref.detach(), **TOL)
    out.backward(g)
    torch.testing.assert_close(row.weight.grad, part(ref.weight.grad, 1, rank, world), **TOL)
    torch.testing.assert_close(row.bias.grad, ref.bias.grad, **TOL)
    want_dx = xr.grad if not input_is_parallel else part(xr.grad, -1, rank, world)
    torch.testing.assert_close(xp.grad, want_dx, **TOL)
    return ref.weight.detach()


def check_embedding(rank, world):
    vocab, padded = 11, 12
    emb = embedding()
    assert emb.weight.shape == (padded // world, 4)
    assert (emb.vocab_start_index, emb.vocab_end_index) == (rank * padded // world, (rank + 1) * padded // world)
    weight = full_tensor(emb.weight, 0, world)
    assert torch.equal(weight[vocab:], torch.zeros(padded - vocab, 4, dtype=F64)), "padding rows are zero"
    ref = nn.Embedding(padded, 4, dtype=F64)
    with torch.no_grad():
        ref.weight.copy_(weight)
    ids = torch.tensor([[0, 5, 6, 10], [11 - 1, 3, 0, 7]])  # ids in every rank's block
    g = randn(2, 4, 4, seed=5)
    out_ref = ref(ids)
    out_ref.backward(g)
    out = emb(ids)
    torch.testing.assert_close(out, out_ref.detach(), **TOL)
    out.backward(g)
    torch.testing.assert_close(emb.weight.grad, part(ref.weight.grad, 0, rank, world), **TOL)
    return weight


def check_embedding_refuses_ids_outside_the_vocabulary(rank, world):
    """At TP 2 an id no rank owns used to give a zero embedding silently; padding ids (11) are refused too."""
    from megatron_tokenformer.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
    emb = VocabParallelEmbedding(12, 4, vocab_size=11, init_std=0.5, seed=3, tag="e", params_dtype=F64)
    for bad in (11, 12, 10 ** 6, -1):
        ids = torch.tensor([[0, 5, bad, 10]])
        with pytest.raises(ValueError, match=rf"^the embedding: token id {bad} is outside the vocabulary \[0, 11\)$"):
            emb(ids)
    logits = randn(1, 4, 12 // world, seed=8)
    for bad in (12, -2):
        with pytest.raises(ValueError, match=rf"^the cross-entropy target: token id {bad} is outside the vocabulary "
                                             r"\[0, 12\)$"):
            vocab_parallel_cross_entropy(logits, torch.tensor([[0, bad, 3, 11]]))


def check_lm_logits(rank, world):
    vocab, padded = 11, 12
    emb = VocabParallelEmbedding(padded, 4, vocab_size=vocab, init_std=0.5, seed=3, tag="e", params_dtype=F64)
    weight = full_tensor(emb.weight, 0, world)[:vocab].requires_grad_()
    h = randn(2, 3, 4, seed=6)
    g = randn(2, 3, padded, seed=7)
    hr, hp = h.clone().requires_grad_(), h.clone().requires_grad_()
    logits_ref = hr @ weight.T  # [2, 3, vocab]
    logits_ref.backward(g[..., :vocab])
    logits_ref = torch.cat([logits_ref.detach(), torch.full((2, 3, padded - vocab), float("-inf"), dtype=F64)], -1)
    logits = parallel_lm_logits(hp, emb)
    assert logits.shape == (2, 3, padded // world)
    want = part(logits_ref, -1, rank, world)
    assert torch.equal(torch.isinf(logits), torch.isinf(want)), "padding logits are -inf, the others finite"
    torch.testing.assert_close(logits, want, **TOL)
    logits.backward(part(g, -1, rank, world))  # each rank's logit gradient is its own block
    grad_full = torch.cat([weight.grad, torch.zeros(padded - vocab, 4, dtype=F64)])
    torch.testing.assert_close(emb.weight.grad, part(grad_full, 0, rank, world), **TOL)
    torch.testing.assert_close(hp.grad, hr.grad, **TOL)


def check_errors(rank, world):
    if world == 1:  # every size divides by 1
        assert ColumnParallelLinear(4, 7).weight.shape == (7, 4) and RowParallelLinear(7, 4).weight.shape == (4, 7)
        assert VocabParallelEmbedding(7, 4).weight.shape == (7, 4)
        return
    with pytest.raises(ValueError, match=rf"c: output size \(7\) is not divisible by {world}"):
        ColumnParallelLinear(4, 7, tag="c")
    with pytest.raises(ValueError, match=rf"r: input size \(7\) is not divisible by {world}"):
        RowParallelLinear(7, 4, tag="r")
    with pytest.raises(ValueError, match=rf"padded vocabulary size \(7\) is not divisible by {world}"):
        VocabParallelEmbedding(7, 4)


def check_sequence_parallel_linear(rank, world):
    """linear_from_sequence_parallel_region against F.linear on the whole sequence: outputs equal, the input
    gradient is this rank's chunk of the sum of every rank's input gradient (each rank holds a different
    upstream gradient), weight/bias gradients are this rank's own; and what autograd keeps is the local
    chunk, not the gathered sequence."""
    b, s, d = 2, 8, 6
    x_full = randn(b, s, d, seed=1)
    weights = [randn(5, d, seed=2).requires_grad_(), randn(4, d, seed=3).requires_grad_()]
    biases = [randn(5, seed=4).requires_grad_(), randn(4, seed=5).requires_grad_()]
    upstream = [[randn(b, s, w.shape[0], seed=10 + 2 * r + i) for i, w in enumerate(weights)] for r in range(world)]
    x = x_full.chunk(world, dim=1)[rank].clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        outs = linear_from_sequence_parallel_region(x, weights, biases)
    assert {t.data_ptr() for t in saved} == {x.data_ptr()} | {w.data_ptr() for w in weights}
    sum((o * g).sum() for o, g in zip(outs, upstream[rank])).backward()
    ref_x = x_full.clone().requires_grad_()
    for r in range(world):
        ref_w = [w.detach().clone().requires_grad_() for w in weights]
        ref_b = [bb.detach().clone().requires_grad_() for bb in biases]
        ref = [F.linear(ref_x, w, bb) for w, bb in zip(ref_w, ref_b)]
        sum((o * g).sum() for o, g in zip(ref, upstream[r])).backward()
        if r == rank:
            for o, want in zip(outs, ref):
                torch.testing.assert_close(o, want.detach(), **TOL)
            for got, want in zip(weights + biases, ref_w + ref_b):
                torch.testing.assert_close(got.grad, want.grad, **TOL)
    torch.testing.assert_close(x.grad, ref_x.grad.chunk(world, dim=1)[rank], **TOL)


tp_pool = dist_pool.pool_fixture(1, 2, 4)


def assert_tp1_init(gathered, tp1_weight):
    for rank, weight in enumerate(gathered):
        assert torch.equal(weight, tp1_weight.detach()), f"rank {rank}: the gathered weight is not the TP = 1 init"


@pytest.mark.parametrize("gather_output", [False, True], ids=["local-output", "gather-output"])
def test_column_parallel_linear_matches_nn_linear(tp_pool, gather_output):
    assert_tp1_init(tp_pool.run(check_column, gather_output), column(gather_output).weight)


@pytest.mark.parametrize("input_is_parallel", [True, False], ids=["parallel-input", "replicated-input"])
def test_row_parallel_linear_matches_nn_linear(tp_pool, input_is_parallel):
    assert_tp1_init(tp_pool.run(check_row, input_is_parallel), row_layer(input_is_parallel).weight)


def test_sequence_parallel_linear_keeps_the_local_chunk(tp_pool):
    tp_pool.run(check_sequence_parallel_linear)


def test_vocab_parallel_embedding_matches_nn_embedding(tp_pool):
    assert_tp1_init(tp_pool.run(check_embedding), embedding().weight)


def test_embedding_and_cross_entropy_refuse_ids_outside_the_vocabulary(tp_pool):
    tp_pool.run(check_embedding_refuses_ids_outside_the_vocabulary)


def test_token_id_check_on_an_accelerator_only_queues_an_assertion(monkeypatch):
    """Off the CPU the check reads nothing back to the host (a meta tensor has no values to read: any
    host read would raise) and queues one torch._assert_async on a boolean scalar of the device."""
    from megatron_tokenformer.tensor_parallel import utils
    queued = []
    monkeypatch.setattr(torch, "_assert_async", lambda t: queued.append((t.device.type, t.dtype, t.shape)))
    utils.check_token_ids(torch.tensor([[1, 500]], device="meta"), 11, "the embedding")
    assert queued == [("meta", torch.bool, torch.Size([]))]
    utils.check_token_ids(torch.tensor([[1, 5]]), 11, "the embedding")   # the CPU path does not queue
    assert len(queued) == 1


def test_parallel_lm_logits_matches_matmul(tp_pool):
    tp_pool.run(check_lm_logits)


def test_indivisible_sizes_are_refused(tp_pool):
    tp_pool.run(check_errors)


def test_vocab_larger_than_padded_is_refused():
    with pytest.raises(ValueError, match=r"vocab_size \(13\) exceeds the padded size \(12\)"):
        VocabParallelEmbedding(12, 4, vocab_size=13)


def test_padding_mask_does_not_copy_the_logits():
    """The -inf mask on the vocabulary padding is applied in place: the forward allocates one logits-sized
    tensor (F.linear's output), and that is the tensor returned; numerics as check_lm_logits (run at TP 1
    here and in the pool)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    vocab, padded = 11, 12
    emb = VocabParallelEmbedding(padded, 4, vocab_size=vocab, init_std=0.5, seed=3, tag="e", params_dtype=F64)
    h = randn(2, 3, 4, seed=6).requires_grad_()
    storages = set()

    class LogitAllocations(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor) and t.numel() == 2 * 3 * padded:
                    storages.add(t.untyped_storage().data_ptr())
            return out

    with LogitAllocations():
        logits = parallel_lm_logits(h, emb)
    assert storages == {logits.untyped_storage().data_ptr()}, f"{len(storages)} logits-sized tensors"
    want = h.detach() @ emb.weight.detach().T
    want[..., vocab:] = float("-inf")
    torch.testing.assert_close(logits, want, **TOL)
    logits.backward(torch.ones_like(logits).masked_fill(torch.isinf(logits), 0.0))
    torch.testing.assert_close(h.grad, torch.ones(2, 3, vocab, dtype=F64) @ emb.weight.detach()[:vocab], **TOL)


def test_sequence_parallel_linear_names_where_its_weights_start():
    import inspect

    from megatron_tokenformer.tensor_parallel.layers import _LinearFromSequenceParallelRegion as fn
    params = list(inspect.signature(fn.forward).parameters)
    assert params[0] == "ctx" and params[-1] == "params" and len(params[1:-1]) == fn.WEIGHTS_START
