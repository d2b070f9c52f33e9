"""The drop-in Pattention against a plain float64 reference of DESIGN.md §1, and growth (§5)."""

import math

import pytest
import torch

from megatron_tokenformer import Pattention
from tests.helpers import plain_reference

NORMS = ("l2_norm_gelu", "gelu_l2_norm", "softmax")


def reference(x, keys, values, normalization, tau, eps=1e-6):
    """Plain float64 Pattention (tests/helpers/plain_reference.pattention): A = X Kᵀ, S = f(A) over the n
    tokens, O = S V."""
    return plain_reference.pattention(x.double(), keys.double(), values.double(), normalization, tau, eps)


def assert_close_scaled(got, ref, tol=1e-5):
    """max |got - ref| <= tol * max |ref| (fp32 against a float64 reference)."""
    err = (got.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= tol * scale, f"max error {err:.3g} > {tol:g} x scale {scale:.3g}"


def make_input(shape, in_features, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, in_features, generator=g) * scale
    x.view(-1, in_features)[0] = 0.0  # an all-zero row must not give NaN
    return x.to(dtype)


@pytest.mark.parametrize("normalization", NORMS)
@pytest.mark.parametrize("shape", [(7,), (2, 5), (2, 3, 4)])
def test_fp32_matches_reference(normalization, shape):
    torch.manual_seed(1)
    layer = Pattention(24, 20, 16, normalization=normalization, key_init_std=0.3, value_init_std=0.5)
    x = make_input(shape, 24).requires_grad_()
    out = layer(x)
    assert out.shape == shape + (20,) and out.dtype == torch.float32
    keys = layer.key_param_tokens.detach().double().requires_grad_()
    values = layer.value_param_tokens.detach().double().requires_grad_()
    x_ref = x.detach().double().requires_grad_()
    ref = reference(x_ref, keys, values, normalization, math.sqrt(16))
    assert_close_scaled(out, ref)

    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (out.double() * w).sum().backward()
    (ref * w).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert_close_scaled(x.grad, x_ref.grad)
    assert_close_scaled(layer.key_param_tokens.grad, keys.grad)
    assert_close_scaled(layer.value_param_tokens.grad, values.grad)


@pytest.mark.parametrize("normalization", NORMS)
def test_zero_row_output(normalization):
    layer = Pattention(8, 6, 4, normalization=normalization)
    out = layer(torch.zeros(3, 8))
    assert torch.isfinite(out).all()
    if normalization == "softmax":  # uniform weights n * 1/n = 1 on every token
        expected = layer.value_param_tokens.detach().sum(0).expand(3, 6)
    else:  # GeLU(0) = 0
        expected = torch.zeros(3, 6)
    torch.testing.assert_close(out.detach(), expected)


@pytest.mark.parametrize("normalization", NORMS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matches_reference(normalization, dtype):
    torch.manual_seed(3)
    layer = Pattention(32, 16, 64, normalization=normalization, key_init_std=1.0, value_init_std=0.5).to(dtype)
    # fp16: |A| ~ 300, A^2 overflows fp16 (max 65504): the statistics must be fp32 to stay finite
    scale = 50.0 if dtype == torch.float16 else 1.0
    x = make_input((4, 6), 32, dtype=dtype, scale=scale).requires_grad_()
    out = layer(x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    ref = reference(x.detach(), layer.key_param_tokens.detach(), layer.value_param_tokens.detach(),
                    normalization, 8.0)
    rel = (out.double() - ref).norm() / ref.norm()
    assert rel < 2e-2, f"relative error {rel:.3g}"
    # gradients (away from the zero row, where tau / sqrt(eps) legitimately exceeds the fp16 range)
    x = make_input((4, 6), 32, dtype=dtype, scale=scale, seed=1)[1:].detach().requires_grad_()
    layer(x).float().sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.key_param_tokens.grad).all()


def test_tau_default_and_explicit():
    assert Pattention(4, 4, 9).tau == 3.0
    layer = Pattention(4, 4, 9, tau=1.5)
    assert isinstance(layer.tau, float) and layer.tau == 1.5
    assert [n for n, _ in layer.named_parameters()] == ["key_param_tokens", "value_param_tokens"]
    assert layer.key_param_tokens.shape == (9, 4) and layer.value_param_tokens.shape == (9, 4)


def test_bad_arguments():
    with pytest.raises(ValueError, match="normalization"):
        Pattention(4, 4, 4, normalization="relu")
    with pytest.raises(ValueError, match="num_param_tokens"):
        Pattention(4, 4, 0)
    with pytest.raises(ValueError, match="last dimension 4"):
        Pattention(4, 4, 4)(torch.zeros(2, 5))


@pytest.mark.parametrize("normalization", ["l2_norm_gelu", "gelu_l2_norm"])
def test_grow_preserves_function_and_trains(normalization):
    torch.manual_seed(4)
    layer = Pattention(16, 12, 8, normalization=normalization, key_init_std=0.5, value_init_std=0.5)
    x = make_input((3, 5), 16, seed=5)
    before = layer(x).detach()
    tau = layer.tau
    layer.grow(6, new_value_std=0.1)
    assert layer.num_param_tokens == 14 and layer.tau == tau
    assert layer.key_param_tokens.shape == (14, 16) and layer.value_param_tokens.shape == (14, 12)
    assert torch.count_nonzero(layer.key_param_tokens[8:]) == 0
    assert torch.count_nonzero(layer.value_param_tokens[8:]) > 0
    after = layer(x)
    assert (after.detach() - before).abs().max().item() <= 1e-6
    (after * torch.randn(after.shape, generator=torch.Generator().manual_seed(6))).sum().backward()
    new_key_grad = layer.key_param_tokens.grad[8:]
    assert new_key_grad.abs().min(dim=1).values.gt(0).all(), "every new key token must receive a gradient"


def test_grow_softmax_refuses_or_warns():
    layer = Pattention(8, 8, 4, normalization="softmax")
    with pytest.raises(ValueError, match="softmax.*allow_function_change"):
        layer.grow(2)
    assert layer.num_param_tokens == 4 and layer.key_param_tokens.shape == (4, 8)
    with pytest.warns(UserWarning, match="softmax"):
        layer.grow(2, allow_function_change=True)
    assert layer.num_param_tokens == 6 and layer.value_param_tokens.shape == (6, 8)
    with pytest.raises(ValueError, match="num_new_tokens"):
        layer.grow(0)
