"""ops/pattention_norm.py: f(A) against the formulas of docs/design.md §1, and the reduction hooks.

The hooks are what tensor parallelism plugs into. Here they emulate two ranks holding identical
halves of the parameter tokens: summing a statistic over the ranks doubles it, so f applied with
``sum_reduce = 2x`` to A must equal the first half of f applied, with no reduction, to [A, A] of
twice the tokens.
"""

import pytest
import torch
import torch.nn.functional as F

from megatron_tokenformer.ops.pattention_norm import check_normalization, normalize_pattention_scores

NORMS = ("l2_norm_gelu", "gelu_l2_norm", "softmax")
EPS = 1e-6


def scores(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2.0


def formula(a, normalization, tau, n):
    """f(A) in float64 (n = global token count, used by softmax)."""
    a = a.double()
    if normalization == "l2_norm_gelu":
        return F.gelu(tau * a / torch.sqrt((a * a).sum(-1, keepdim=True) + EPS))
    if normalization == "gelu_l2_norm":
        g = F.gelu(a)
        return tau * g / torch.sqrt((g * g).sum(-1, keepdim=True) + EPS)
    return n * torch.softmax(a, dim=-1)


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
