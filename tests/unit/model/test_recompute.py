"""Recomputation plans (Megatron's uniform / block) and equality of losses and gradients with none."""

import pytest
import torch

from megatron_tokenformer.config import TokenformerConfig
from megatron_tokenformer.model.language_model import TokenformerLM
from megatron_tokenformer.model.recompute import full_recompute_chunks


def test_chunks():
    assert full_recompute_chunks(5, None, None, None) == [(0, 5, False)]
    assert full_recompute_chunks(5, "selective", None, None) == [(0, 5, False)]
    assert full_recompute_chunks(5, "full", "uniform", 2) == [(0, 2, True), (2, 4, True), (4, 5, True)]
    assert full_recompute_chunks(5, "full", "block", 2) == [(0, 1, True), (1, 2, True), (2, 5, False)]
    assert full_recompute_chunks(2, "full", "block", 3) == [(0, 1, True), (1, 2, True)]


MODES = {"selective": dict(recompute_granularity="selective"),
         "full-uniform-2": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
         "full-block-1": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
         "checkpoint-activations": dict(checkpoint_activations=True)}


def _loss_and_grads(model_type, **overrides):
    cfg = TokenformerConfig(num_layers=3, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=50,
                            qkv_num_param_tokens=8, proj_num_param_tokens=8, ffn_num_param_tokens=16,
                            model_type=model_type, **overrides)
    model = TokenformerLM(cfg, seed=5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (2, 16), generator=g)
    loss = model(ids, torch.roll(ids, -1, 1))
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("model_type", ["tokenformer", "transformer"])
def test_recompute_modes_equal_no_recompute(model_type):
    ref_loss, ref_grads = _loss_and_grads(model_type)
    for name, overrides in MODES.items():
        loss, grads = _loss_and_grads(model_type, **overrides)
        assert torch.equal(loss, ref_loss), name
        for key, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[key], rtol=1e-6, atol=1e-7, msg=f"{name}: {key}")
