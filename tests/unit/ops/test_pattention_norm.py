"""ops/pattention_norm.py: f(A) against the formulas of docs/design.md §1, and the reduction hooks.

The hooks are what tensor parallelism plugs into. Here they emulate two ranks holding identical
halves of the parameter tokens: summing a statistic over the ranks doubles it, so f applied with
``sum_reduce = 2x`` to A must equal the first half of f applied, with no reduction, to [A, A] of
twice the tokens.

Second half: the memory-lean function (PattentionNormCombine) against the autograd composition.

The reference is ``pattention_normalize_combine(..., lean=False)``: normalize_pattention_scores (plain
torch ops differentiated by autograd, itself checked against a float64 re-derivation of docs/design.md §1
in tests/unit/model/test_pattention.py) followed by S V. At TP = 2 / 4 each spawned rank holds a
contiguous block of the n tokens and the reference is the full single-process computation
(:func:`check_tensor_parallel`, on the session's shared TP = 2 and 4 pools of tests/helpers/dist_pool.py).
"""

import pytest
import torch

from megatron_tokenformer.ops.pattention_norm import (
    NORMALIZATIONS,
    check_normalization,
    normalize_pattention_scores,
    pattention_normalize_combine,
)
from tests.helpers import dist_pool, plain_reference

NORMS = ("l2_norm_gelu", "gelu_l2_norm", "softmax")
EPS = 1e-6


def scores(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2.0


def formula(a, normalization, tau, n):
    """f(A) in float64 (n = global token count, used by softmax): tests/helpers/plain_reference."""
    return plain_reference.pattention_scores(a.double(), normalization, tau, n, EPS)


@pytest.mark.parametrize("normalization", NORMS)
def test_matches_formula(normalization):
    a = scores(2, 5, 8)
    (out,) = normalize_pattention_scores([a], normalization, [1.7], [8], EPS)
    assert out.dtype == torch.float32 and out.shape == a.shape
    torch.testing.assert_close(out.double(), formula(a, normalization, 1.7, 8), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("normalization", NORMS)
def test_reductions_see_the_whole_token_dimension(normalization):
    a, b = scores(3, 4, seed=1), scores(3, 6, seed=2)
    calls = []

    def sum_reduce(t):  # two ranks holding the same half: the sum doubles
        calls.append(("sum", t.shape))
        return 2.0 * t

    def max_reduce(t):
        calls.append(("max", t.shape))
        return t

    outs = normalize_pattention_scores([a, b], normalization, [1.5, 2.5], [8, 12], EPS,
                                       sum_reduce=sum_reduce, max_reduce=max_reduce)
    for out, x, tau, n in zip(outs, (a, b), (1.5, 2.5), (8, 12)):
        full = formula(torch.cat([x, x], dim=-1), normalization, tau, n)
        torch.testing.assert_close(out.double(), full[..., :x.shape[-1]], rtol=1e-5, atol=1e-6)
    # ONE call per reduction for both tensors, on their row statistics together (3 + 3 rows)
    expected = [("sum", (6,))] if normalization != "softmax" else [("max", (6,)), ("sum", (6,))]
    assert calls == expected


@pytest.mark.parametrize("normalization", NORMS)
def test_gradient_flows_through_the_reduced_statistic(normalization):
    """With the two emulated halves tied (A' = A), d/dA of f([A, A'])[:half] counts the statistic's
    dependence on both halves: exactly the 2x of the emulated sum's backward."""
    a = scores(2, 4, seed=3).requires_grad_()
    ref = a.detach().double().requires_grad_()
    up = scores(2, 4, seed=4)
    (out,) = normalize_pattention_scores([a], normalization, [2.0], [8], EPS, sum_reduce=lambda t: 2.0 * t,
                                         max_reduce=lambda t: t)
    out.backward(up)
    (formula(torch.cat([ref, ref], dim=-1), normalization, 2.0, 8)[..., :4] * up.double()).sum().backward()
    torch.testing.assert_close(a.grad.double(), ref.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("normalization", ["l2_norm_gelu", "gelu_l2_norm"])
def test_zero_row_gives_zeros(normalization):
    a = scores(2, 8)
    a[1] = 0.0
    (out,) = normalize_pattention_scores([a], normalization, [3.0], [8], EPS)
    assert torch.equal(out[1], torch.zeros(8)) and torch.isfinite(out).all()


@pytest.mark.parametrize("normalization", NORMS)
def test_low_precision_keeps_dtype_and_uses_fp32_statistics(normalization):
    a = scores(4, 16).to(torch.bfloat16)
    (out,) = normalize_pattention_scores([a], normalization, [4.0], [16], EPS)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), formula(a, normalization, 4.0, 16), rtol=8e-3, atol=1e-2)


def test_unknown_normalization():
    check_normalization("softmax")
    with pytest.raises(ValueError, match=r"unknown Pattention normalization 'relu'; choose one of "
                                         + r"\('l2_norm_gelu', 'gelu_l2_norm', 'softmax'\)"):
        normalize_pattention_scores([scores(2, 2)], "relu", [1.0], [2])


# ---- the memory-lean autograd function (PattentionNormCombine)

T, N, D_OUT = 12, 16, 10


def make(seed, dtype=torch.float32, rows=T, n=N, d_out=D_OUT, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, n, generator=g, dtype=torch.float64) * scale
    a[0] = 0.0  # an all-zero row of scores
    v = torch.randn(n, d_out, generator=g, dtype=torch.float64) * 0.5
    w = torch.randn(rows, d_out, generator=g, dtype=torch.float64)
    return a.to(dtype), v.to(dtype), w.to(dtype)


def run(a, v, w, normalization, lean, tau=3.0, n=None, **reductions):
    a = a.detach().clone().requires_grad_()
    v = v.detach().clone().requires_grad_()
    (out,) = pattention_normalize_combine([a], [v], normalization, [tau], [n or a.shape[-1]], lean=lean,
                                          **reductions)
    (out.float() * w.float()).sum().backward()
    return out.detach(), a.grad, v.grad


def rel_err(got, ref):
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp(min=1e-30)).item()


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_fp32_matches_autograd(normalization):
    a, v, w = make(0)
    for got, ref in zip(run(a, v, w, normalization, True), run(a, v, w, normalization, False)):
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        assert rel_err(got, ref) <= 1e-6


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_bf16_matches_autograd(normalization):
    a, v, w = make(1, torch.bfloat16)
    for got, ref in zip(run(a, v, w, normalization, True), run(a, v, w, normalization, False)):
        assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
        rel = ((got.double() - ref.double()).norm() / ref.double().norm()).item()
        assert rel < 2e-2, rel  # the low-precision tolerance of tests/unit/model/test_pattention.py


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_float64_stays_float64_and_gradcheck(normalization):
    a, v, _ = make(2, torch.float64, rows=5, n=6, d_out=3)
    a.requires_grad_()
    v.requires_grad_()
    (out,) = pattention_normalize_combine([a], [v], normalization, [2.0], [6])
    assert out.dtype == torch.float64

    def fn(a, v):
        return pattention_normalize_combine([a], [v], normalization, [2.0], [6])[0]

    assert torch.autograd.gradcheck(fn, (a, v), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_batched_tensors_match_one_at_a_time(normalization):
    """Several Pattentions in one call (one reduction each way) = each alone (leading dims [b, s])."""
    tensors = [make(10 + i, n=8 + 4 * i, d_out=6) for i in range(3)]
    scores = [a.reshape(3, 4, -1).requires_grad_() for a, _, _ in tensors]
    values = [v.clone().requires_grad_() for _, v, _ in tensors]
    outs = pattention_normalize_combine(scores, values, normalization, [1.0, 2.0, 3.0], [8, 12, 16])
    sum((o * w.reshape(3, 4, -1)).sum() for o, (_, _, w) in zip(outs, tensors)).backward()
    for i, (a, v, w) in enumerate(tensors):
        out, ga, gv = run(a.reshape(3, 4, -1), v, w.reshape(3, 4, -1), normalization, False, tau=float(i + 1))
        assert rel_err(outs[i].detach(), out) <= 1e-6
        assert rel_err(scores[i].grad, ga) <= 1e-6 and rel_err(values[i].grad, gv) <= 1e-6


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_zero_rows_give_zeros_not_nan(normalization):
    v = torch.randn(N, D_OUT, generator=torch.Generator().manual_seed(3))
    w = torch.randn(4, D_OUT, generator=torch.Generator().manual_seed(4))
    out, ga, gv = run(torch.zeros(4, N), v, w, normalization, True)
    assert torch.isfinite(out).all() and torch.isfinite(ga).all() and torch.isfinite(gv).all()
    if normalization == "softmax":  # uniform weights n * 1/n = 1: each row is Σ V
        torch.testing.assert_close(out, v.sum(0).expand(4, D_OUT))
    else:  # GeLU(0) = 0: zero output, zero value gradient
        assert out.abs().max() == 0 and gv.abs().max() == 0
    for got, ref in zip((out, ga, gv), run(torch.zeros(4, N), v, w, normalization, False)):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


def saved_bytes(fn):
    """Bytes autograd keeps for backward while fn() runs (distinct storages counted once)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_saved_bytes_below_autograd_path(normalization, dtype):
    a, v, _ = make(4, dtype, rows=64, n=128, d_out=32)
    a.requires_grad_()
    v.requires_grad_()
    lean = saved_bytes(lambda: pattention_normalize_combine([a], [v], normalization, [3.0], [128]))
    old = saved_bytes(lambda: pattention_normalize_combine([a], [v], normalization, [3.0], [128], lean=False))
    # lean: A (input dtype) + V + fp32 row statistics; nothing else of size T x n
    per_row_stats = 2 if normalization == "softmax" else 1
    assert lean == a.numel() * a.element_size() + v.numel() * v.element_size() + 64 * 4 * per_row_stats
    assert lean < old, (lean, old)


def check_tensor_parallel(rank, world):
    """Run on every rank of a TP = world gloo group (test_lean_function_at_tensor_parallel)."""
    from megatron_tokenformer.tensor_parallel.mappings import (
        all_reduce_max_no_grad,
        all_reduce_sum_no_grad,
        reduce_from_tensor_model_parallel_region,
    )
    chunk = slice(rank * N // world, (rank + 1) * N // world)
    for dtype in (torch.float32, torch.bfloat16):
        for normalization in NORMALIZATIONS:
            a_full, v_full, w = make(5, dtype)
            ref_out, ref_ga, ref_gv = run(a_full, v_full, w, normalization, False)
            a = a_full[:, chunk].clone().requires_grad_()
            v = v_full[chunk].clone().requires_grad_()
            (partial,) = pattention_normalize_combine([a], [v], normalization, [3.0], [N],
                                                      sum_reduce=all_reduce_sum_no_grad,
                                                      max_reduce=all_reduce_max_no_grad)
            out = reduce_from_tensor_model_parallel_region(partial)
            (out.float() * w.float()).sum().backward()
            pairs = ((out.detach(), ref_out), (a.grad, ref_ga[:, chunk]), (v.grad, ref_gv[chunk]))
            for got, ref in pairs:
                assert torch.isfinite(got).all()
                if dtype == torch.float32:
                    assert rel_err(got, ref) <= 1e-6, (normalization, rel_err(got, ref))
                else:
                    rel = ((got.double() - ref.double()).norm() / ref.double().norm()).item()
                    assert rel < 2e-2, (normalization, rel)


tp_pool = dist_pool.pool_fixture(2, 4)  # the pools the tensor_parallel tests hold too (one spawn per session)


def test_lean_function_at_tensor_parallel(tp_pool):
    tp_pool.run(check_tensor_parallel)


def test_the_function_names_its_non_tensor_arguments():
    """NON_TENSOR_ARGS is forward's signature between ctx and the tensors; the value tensors' gradients
    are looked up behind them: V's gradient is None exactly when V does not require it."""
    import inspect

    from megatron_tokenformer.ops.pattention_norm import NON_TENSOR_ARGS, NUM_NON_TENSOR_ARGS, PattentionNormCombine
    params = list(inspect.signature(PattentionNormCombine.forward).parameters)
    assert params[0] == "ctx" and params[-1] == "tensors"
    assert tuple(params[1:-1]) == NON_TENSOR_ARGS and NUM_NON_TENSOR_ARGS == len(NON_TENSOR_ARGS)
    a, v, w = make(20, n=8, d_out=4)
    a2, v2, _ = make(21, n=12, d_out=4)
    a, a2, v2 = a.requires_grad_(), a2.requires_grad_(), v2.requires_grad_()
    outs = pattention_normalize_combine([a, a2], [v, v2], "l2_norm_gelu", [1.0, 2.0], [8, 12])
    (outs[0] * w).sum().backward(retain_graph=True)
    (outs[1] * w).sum().backward()
    assert v.grad is None and v2.grad is not None and a.grad is not None and a2.grad is not None
    _, ga, _ = run(a.detach(), v, w, "l2_norm_gelu", False, tau=1.0)
    assert rel_err(a.grad, ga) <= 1e-6


def test_one_function_and_one_kernel_set_per_variant():
    """No class is built per call: the kernels are cached per (normalisation, fused); the autograd
    composition's cross-partition sum is one module-level Function (its gradient is the sum too)."""
    from megatron_tokenformer.ops.pattention_norm import _autograd_sum, _SumOverPartitions, elementwise_kernels
    assert elementwise_kernels("softmax") is elementwise_kernels("softmax")
    assert elementwise_kernels("softmax", True) is not elementwise_kernels("softmax")
    first, second = _autograd_sum(lambda t: 2 * t), _autograd_sum(lambda t: 3 * t)
    assert first.func.__self__ is second.func.__self__ is _SumOverPartitions
    x = torch.ones(3, requires_grad=True)
    second(x).sum().backward()
    assert torch.equal(second(x).detach(), torch.full((3,), 3.0)) and torch.equal(x.grad, torch.full((3,), 3.0))
