"""model/block.py: TokenformerBlock against the block written out in plain float64 torch, at TP 1, 2 and 4.

Reference (tests/helpers/plain_reference.tokenformer_block): X + Attention(LN(X)), then
+ Pattention_FFN(LN(X)), from the TP = 1 parameters each rank gathers from the shards; those must be
exactly the TP = 1 block's (built in the test process: initialisation does not depend on the layout).
"""

import pytest
import torch

from megatron_tokenformer.config import TokenformerConfig
from megatron_tokenformer.model.block import TokenformerBlock
from megatron_tokenformer.model.language_model import prepare_config
from tests.helpers import dist_pool, plain_reference
from tests.helpers.tp_gather import full_parameters, shard

TOL = dict(rtol=1e-4, atol=1e-4)  # fp32 module vs float64 reference; values are O(1)
B, S, D, HEADS = 2, 8, 32, 4


def config(**overrides):
    base = dict(num_layers=2, hidden_size=D, num_attention_heads=HEADS, seq_length=S, vocab_size=10,
                qkv_num_param_tokens=8, proj_num_param_tokens=12, ffn_num_param_tokens=16, init_method_std=0.2,
                value_init=0.3)
    base.update(overrides)
    return TokenformerConfig(**base)


def make_block(normalization, block_layernorm):
    cfg = prepare_config(config(pattention_normalization=normalization, block_layernorm=block_layernorm))
    return cfg, TokenformerBlock(cfg, layer_number=2, seed=11)


def check_matches_reference(rank, world, normalization, block_layernorm):
    cfg, block = make_block(normalization, block_layernorm)
    init = {n: t.detach().float() for n, t in full_parameters(block, world).items()}
    parametric = block_layernorm == "parametric"
    expected = {f"attention.{m}.{k}_param_tokens" for m in ("query", "key", "value", "dense")
                for k in ("key", "value")} | {"mlp.key_param_tokens", "mlp.value_param_tokens"}
    if parametric:
        expected |= {f"{ln}.{w}" for ln in ("input_layernorm", "post_attention_layernorm") for w in ("weight", "bias")}
        with torch.no_grad():  # non-trivial affine maps
            for name, p in block.named_parameters():
                if "layernorm" in name:
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3)
    assert {n for n, _ in block.named_parameters()} == expected
    full = {n: t.double().requires_grad_() for n, t in full_parameters(block, world).items()}
    gen = torch.Generator().manual_seed(5)
    x, g = torch.randn(B, S, D, generator=gen), torch.randn(B, S, D, generator=gen)
    xr, xp = x.double().requires_grad_(), x.clone().requires_grad_()
    want = plain_reference.tokenformer_block(
        xr, full, HEADS, normalization, {"qkv": cfg.qkv_tau, "proj": cfg.proj_tau, "ffn": cfg.ffn_tau},
        cfg.norm_epsilon_pattention, cfg.rotary_dim, cfg.layernorm_epsilon, parametric, cfg.rotary_base)
    want.backward(g.double())
    out = block(xp)
    torch.testing.assert_close(out.double(), want.detach(), **TOL)
    out.backward(g)
    torch.testing.assert_close(xp.grad.double(), xr.grad, **TOL)
    for name, p in block.named_parameters():
        torch.testing.assert_close(p.grad.double(), shard(full[name].grad, p, rank, world), **TOL,
                                   msg=lambda m, name=name: f"{name}: {m}")
    return init


def check_layer_number_seeds_the_init(rank, world):
    cfg = prepare_config(config())
    first, again, second = (TokenformerBlock(cfg, layer_number=n, seed=11) for n in (1, 1, 2))
    for (name, a), (_, b), (_, c) in zip(first.named_parameters(), again.named_parameters(),
                                         second.named_parameters()):
        assert torch.equal(a, b), name
        assert not torch.equal(a, c), name


def check_fused_norm_equals_plain(rank, world):
    """config.fused_pattention_norm reaches every Pattention of the block and keeps the function: the same
    block (same seed) with the compiled normalisation gives the plain block's output and gradients."""
    gen = torch.Generator().manual_seed(7)
    x, g = torch.randn(B, S, D, generator=gen), torch.randn(B, S, D, generator=gen)
    results = []
    for fused in (False, True):
        block = TokenformerBlock(prepare_config(config(fused_pattention_norm=fused)), layer_number=1, seed=11)
        assert {m.fused_norm for m in block.modules() if hasattr(m, "fused_norm")} == {fused}
        xp = x.clone().requires_grad_()
        out = block(xp)
        out.backward(g)
        results.append([out.detach(), xp.grad] + [p.grad for _, p in block.named_parameters()])
    for plain, fused in zip(*results):  # max |difference| relative to the tensor's max |value| (fp32 rounding)
        assert (fused - plain).abs().max() <= 1e-5 * plain.abs().max(), (fused - plain).abs().max()


tp_pool = dist_pool.pool_fixture(1, 2, 4)
tp2_pool = dist_pool.pool_fixture(2)  # the same TP = 2 ranks


@pytest.mark.parametrize("normalization,block_layernorm", [("l2_norm_gelu", "nonparametric"),
                                                           ("gelu_l2_norm", "parametric"),
                                                           ("softmax", "nonparametric")])
def test_matches_plain_block(tp_pool, normalization, block_layernorm):
    gathered = tp_pool.run(check_matches_reference, normalization, block_layernorm)
    _, tp1 = make_block(normalization, block_layernorm)  # this process has no group: the TP = 1 block
    for rank, init in enumerate(gathered):
        for name, p in tp1.named_parameters():
            assert torch.equal(init[name], p.detach()), f"rank {rank}: {name} is not the TP = 1 init"


def test_layer_number_seeds_the_init(tp_pool):
    tp_pool.run(check_layer_number_seeds_the_init)


def test_fused_norm_equals_plain(tp2_pool):
    """At TP 2 (the reductions inside the compiled path); TP 1 is the op-level test of
    tests/unit/ops/test_pattention_norm_fused.py."""
    tp2_pool.run(check_fused_norm_equals_plain)
