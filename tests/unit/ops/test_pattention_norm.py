"""The memory-lean Pattention function (PattentionNormCombine) against the autograd composition.

The reference is ``pattention_normalize_combine(..., lean=False)``: normalize_pattention_scores (plain
torch ops differentiated by autograd, itself checked against a float64 re-derivation of DESIGN.md §1
in tests/unit/model/test_pattention.py) followed by S V. At TP = 2 / 4 each spawned rank holds a
contiguous block of the n tokens and the reference is the full single-process computation
(:func:`check_tensor_parallel`, run inside the TP = 2 and 4 workers of
tests/unit/tensor_parallel/test_tp_equivalence.py).
"""

import pytest
import torch

from megatron_tokenformer.ops.pattention_norm import NORMALIZATIONS, pattention_normalize_combine

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
    """Run on every rank of a TP = world gloo group (by the spawned workers of
    tests/unit/tensor_parallel/test_tp_equivalence.py, which already hold one, to save a spawn)."""
    from megatron_tokenformer.tensor_parallel.mappings import (all_reduce_max_no_grad, all_reduce_sum_no_grad,
                                                               reduce_from_tensor_model_parallel_region)
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
