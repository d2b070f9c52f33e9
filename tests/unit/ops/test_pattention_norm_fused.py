"""The fused (``torch.compile``d) elementwise kernels of the lean Pattention function (issue 14 item 6).

Reference: the autograd composition ``pattention_normalize_combine(..., lean=False)`` (plain torch ops,
itself checked against the formulas of docs/design.md §1 in test_pattention_norm.py). The fused path
must give the same outputs and gradients (fp32 1e-6 relative, bf16 the low-precision tolerance, float64
gradcheck), reduce over token partitions like the plain path (emulated: two ranks holding identical
halves, the sum doubles), and keep no more for backward than the plain lean function.

Compilation runs once per process per step (shapes dynamic, scores flattened to rows), so every test
here shares the same few compiled kernels per normalisation.
"""

import pytest
import torch

from megatron_tokenformer.ops.pattention_norm import NORMALIZATIONS, elementwise_kernels, pattention_normalize_combine
from tests.unit.ops.test_pattention_norm import make, rel_err, saved_bytes


def run(a, v, w, normalization, fused, lean=True, tau=3.0, n=None, **reductions):
    a = a.detach().clone().requires_grad_()
    v = v.detach().clone().requires_grad_()
    (out,) = pattention_normalize_combine([a], [v], normalization, [tau], [n or a.shape[-1]], lean=lean,
                                          fused=fused, **reductions)
    (out.float() * w.float()).sum().backward()
    return out.detach(), a.grad, v.grad


def reference(a, v, w, normalization, **kwargs):
    return run(a, v, w, normalization, fused=False, lean=False, **kwargs)


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_fp32_equals_reference(normalization):
    a, v, w = make(0)
    a, w = a.reshape(3, 4, -1), w.reshape(3, 4, -1)  # leading dims [b, s] are flattened and restored
    for got, ref in zip(run(a, v, w, normalization, True), reference(a, v, w, normalization)):
        assert got.dtype == torch.float32 and got.shape == ref.shape and torch.isfinite(got).all()
        assert rel_err(got, ref) <= 1e-6, rel_err(got, ref)


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_bf16_equals_reference(normalization):
    a, v, w = make(1, torch.bfloat16)
    for got, ref in zip(run(a, v, w, normalization, True), reference(a, v, w, normalization)):
        assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
        rel = ((got.double() - ref.double()).norm() / ref.double().norm()).item()
        assert rel < 2e-2, rel


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_float64_gradcheck(normalization):
    a, v, _ = make(2, torch.float64, rows=5, n=6, d_out=3)
    a.requires_grad_()
    v.requires_grad_()

    def fn(a, v):
        return pattention_normalize_combine([a], [v], normalization, [2.0], [6], fused=True)[0]

    assert fn(a, v).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (a, v), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_partitioned_tokens_reduce_like_the_whole(normalization):
    """Two emulated ranks holding the same half of the tokens (the sum reduction doubles a row statistic,
    the max keeps it): one rank's partial output is half the reference output on the whole problem
    ([A, A] scores, [V; V] values, 2n tokens), and its gradients (upstream gradient w, the reduced output's)
    are the whole problem's gradients on its half of the tokens."""
    a, v, w = make(3, n=8)
    out, grad_a, grad_v = reference(torch.cat([a, a], -1), torch.cat([v, v], 0), w, normalization)
    got = run(a, v, w, normalization, True, n=16, sum_reduce=lambda t: 2.0 * t, max_reduce=lambda t: t)
    assert rel_err(got[0], 0.5 * out) <= 1e-6
    assert rel_err(got[1], grad_a[:, :8]) <= 1e-6
    assert rel_err(got[2], grad_v[:8]) <= 1e-6


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_zero_rows_give_zeros_not_nan(normalization):
    a, v, w = make(4)
    a[:3] = 0.0
    got = run(a, v, w, normalization, True)
    assert all(torch.isfinite(t).all() for t in got)
    for g, r in zip(got, reference(a, v, w, normalization)):
        assert rel_err(g, r) <= 1e-6


def test_saves_no_more_than_the_plain_lean_function():
    a, v, _ = make(5, rows=64, n=128, d_out=32)
    a.requires_grad_()
    v.requires_grad_()
    fused = saved_bytes(lambda: pattention_normalize_combine([a], [v], "l2_norm_gelu", [3.0], [128], fused=True))
    plain = saved_bytes(lambda: pattention_normalize_combine([a], [v], "l2_norm_gelu", [3.0], [128]))
    assert fused == plain == a.numel() * 4 + v.numel() * 4 + 64 * 4


def test_fused_needs_the_lean_function():
    a, v, _ = make(6)
    with pytest.raises(ValueError, match="fused=True needs the memory-lean function"):
        pattention_normalize_combine([a], [v], "softmax", [1.0], [16], lean=False, fused=True)
    assert elementwise_kernels("softmax", fused=True).fused and not elementwise_kernels("softmax").fused
