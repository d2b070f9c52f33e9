"""model/attention.py: TokenformerAttention against a plain causal multi-head reference, at TP 1 and 2.

The reference (tests/helpers/plain_reference.tokenformer_attention) is written from docs/design.md:
Q, K, V, O Pattentions, the closed-form rotary rotation on the first rotary_dim channels of every
head, softmax(q kᵀ / sqrt(head_dim)) over past and present positions. It runs in float64 on the TP = 1
parameters, which each rank gathers from the shards (tests/helpers/tp_gather.py); the rank's output,
input gradient and parameter-gradient slices must match it.
"""

import pytest
import torch

from megatron_tokenformer.config import TokenformerConfig
from megatron_tokenformer.model.attention import KVCache, TokenformerAttention
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


def sample(seed):
    return torch.randn(B, S, D, generator=torch.Generator().manual_seed(seed))


def check_matches_reference(rank, world, normalization, rotary_percent):
    cfg = prepare_config(config(pattention_normalization=normalization, rotary_percent=rotary_percent))
    attn = TokenformerAttention(cfg, layer_number=1, seed=7)
    assert sorted(n for n, _ in attn.named_parameters()) == sorted(
        f"{m}.{k}_param_tokens" for m in ("query", "key", "value", "dense") for k in ("key", "value"))
    full = {n: t.double().requires_grad_() for n, t in full_parameters(attn, world).items()}
    x, g = sample(1), sample(2)
    xr, xp = x.double().requires_grad_(), x.clone().requires_grad_()
    want = plain_reference.tokenformer_attention(xr, full, "", HEADS, normalization,
                                                 {"qkv": cfg.qkv_tau, "proj": cfg.proj_tau},
                                                 cfg.norm_epsilon_pattention, cfg.rotary_dim, cfg.rotary_base)
    want.backward(g.double())
    out = attn(xp)
    torch.testing.assert_close(out.double(), want.detach(), **TOL)
    out.backward(g)
    torch.testing.assert_close(xp.grad.double(), xr.grad, **TOL)
    for name, p in attn.named_parameters():
        torch.testing.assert_close(p.grad.double(), shard(full[name].grad, p, rank, world), **TOL,
                                   msg=lambda m, name=name: f"{name}: {m}")


def check_causal(rank, world):
    attn = TokenformerAttention(prepare_config(config()), layer_number=1, seed=7)
    x = sample(3)
    changed = x.clone()
    changed[:, 5:] = sample(4)[:, 5:]  # change the future of position 4
    with torch.no_grad():
        a, b = attn(x), attn(changed)
    torch.testing.assert_close(a[:, :5], b[:, :5], rtol=1e-6, atol=1e-6)
    assert (a[:, 5:] - b[:, 5:]).abs().amin(dim=-1).gt(0).all(), "later positions see the change"


def check_kv_cache_equals_whole_sequence(rank, world):
    """The sequence in chunks of 5, 1 and 2 positions over a KVCache (layer 2 of a 2-layer cache) equals
    the plain causal attention of the whole sequence; the cache holds every position's keys and values."""
    cfg = prepare_config(config(rotary_percent=0.5))
    attn = TokenformerAttention(cfg, layer_number=2, seed=7)
    full = {n: t.double() for n, t in full_parameters(attn, world).items()}
    x = sample(5)
    want = plain_reference.tokenformer_attention(x.double(), full, "", HEADS, cfg.pattention_normalization,
                                                 {"qkv": cfg.qkv_tau, "proj": cfg.proj_tau},
                                                 cfg.norm_epsilon_pattention, cfg.rotary_dim, cfg.rotary_base)
    cache = KVCache.empty(2)
    with torch.no_grad():
        parts = [attn(x[:, :5], cache), attn(x[:, 5:6], cache), attn(x[:, 6:], cache)]
    torch.testing.assert_close(torch.cat(parts, dim=1).double(), want, **TOL)
    assert cache.keys[0] is None and cache.length(1) == S
    assert cache.keys[1].shape == cache.values[1].shape == (B, HEADS // world, S, D // HEADS)


def check_head_split(rank, world):
    attn = TokenformerAttention(prepare_config(config()), layer_number=1, seed=7)
    assert (attn.head_dim, attn.num_heads_per_partition, attn.hidden_size_per_partition) == \
        (D // HEADS, HEADS // world, D // world)
    if world > 1:
        with pytest.raises(ValueError, match=r"num_attention_heads \(tensor-model-parallel size\) \(3\) is not "
                                             r"divisible by 2"):
            TokenformerAttention(config(num_attention_heads=3, hidden_size=24), layer_number=1)


tp_pool = dist_pool.pool_fixture(1, 2)


@pytest.mark.parametrize("normalization,rotary_percent", [("l2_norm_gelu", 0.25), ("gelu_l2_norm", 0.5),
                                                          ("softmax", 0.0)])
def test_matches_plain_causal_attention(tp_pool, normalization, rotary_percent):
    tp_pool.run(check_matches_reference, normalization, rotary_percent)


def test_is_causal(tp_pool):
    tp_pool.run(check_causal)


def test_kv_cache_equals_whole_sequence(tp_pool):
    tp_pool.run(check_kv_cache_equals_whole_sequence)


def test_heads_split_over_ranks(tp_pool):
    tp_pool.run(check_head_split)


def test_hidden_size_must_split_into_heads():
    with pytest.raises(ValueError, match=r"hidden_size \(30\) is not divisible by 4"):
        TokenformerAttention(config(hidden_size=30), layer_number=1)
