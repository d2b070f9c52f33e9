"""model/layernorm.py against the LayerNorm formula written out in float64 (tests/helpers/plain_reference)."""

import torch

from megatron_tokenformer.model.layernorm import LayerNorm
from tests.helpers import plain_reference

D = 12


def sample(dtype=torch.float32, shift=0.0, seed=0):
    return (torch.randn(2, 5, D, generator=torch.Generator().manual_seed(seed)) * 3.0 + shift).to(dtype)


def test_nonparametric_has_no_parameters_and_normalises():
    ln = LayerNorm(D, eps=1e-5, parametric=False)
    assert list(ln.parameters()) == [] and ln.weight is None and ln.bias is None
    x = sample()
    torch.testing.assert_close(ln(x).double(), plain_reference.layer_norm(x.double(), 1e-5), rtol=1e-5, atol=1e-5)


def test_parametric_output_and_gradients():
    ln = LayerNorm(D, eps=1e-3, parametric=True)
    assert torch.equal(ln.weight, torch.ones(D)) and torch.equal(ln.bias, torch.zeros(D))
    assert all(p.tensor_model_parallel is False for p in (ln.weight, ln.bias)), "replicated on the TP group"
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        ln.weight.copy_(torch.randn(D, generator=g))
        ln.bias.copy_(torch.randn(D, generator=g))
    x = sample().requires_grad_()
    upstream = torch.randn(2, 5, D, generator=g)
    ln(x).backward(upstream)
    xr, w, b = (t.detach().double().requires_grad_() for t in (x, ln.weight, ln.bias))
    plain_reference.layer_norm(xr, 1e-3, w, b).backward(upstream.double())
    for got, want in ((x.grad, xr.grad), (ln.weight.grad, w.grad), (ln.bias.grad, b.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_low_precision_input_uses_fp32_statistics():
    # bf16 rows with a large common offset: the statistics of the bf16 values themselves, taken in
    # fp32, normalise to within bf16 rounding of the float64 result
    x = sample(torch.bfloat16, shift=300.0)
    ln = LayerNorm(D, eps=1e-5, parametric=True).to(torch.bfloat16)
    got = ln(x)
    assert got.dtype == torch.bfloat16
    want = plain_reference.layer_norm(x.double(), 1e-5)
    torch.testing.assert_close(got.double(), want, rtol=8e-3, atol=1e-2)


def test_repr():
    assert repr(LayerNorm(8, eps=1e-6, parametric=False)) == "LayerNorm(8, eps=1e-06, parametric=False)"
