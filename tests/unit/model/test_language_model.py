"""TokenformerLM (TP = 1) against a plain float64 reference of DESIGN.md §2 written from the full weights."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_tokenformer.config import TokenformerConfig
from megatron_tokenformer.model import TokenformerLM
from tests.helpers import plain_reference


def tiny_config(**overrides):
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=61,
                qkv_num_param_tokens=8, proj_num_param_tokens=12, ffn_num_param_tokens=16,
                make_vocab_size_divisible_by=8, init_method_std=0.2, value_init=0.3)
    base.update(overrides)
    return TokenformerConfig(**base)


def ref_rotary(x, rotary_dim, base):
    """x [b, s, h, hd]: rotate channel pairs (j, j + rotary_dim/2), j < rotary_dim/2,
    by angle pos * base^(-2j/rotary_dim)."""
    if rotary_dim == 0:
        return x
    half = rotary_dim // 2
    pos = torch.arange(x.shape[1], dtype=x.dtype)[:, None]
    angle = pos * base ** (-2.0 * torch.arange(half, dtype=x.dtype) / rotary_dim)  # [s, half]
    cos, sin = angle.cos()[None, :, None, :], angle.sin()[None, :, None, :]
    x1, x2, rest = x[..., :half], x[..., half:rotary_dim], x[..., rotary_dim:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def ref_lm_loss(params, cfg, ids, labels, loss_mask):
    """The whole LM in a few lines of float64 torch, from the TP = 1 parameters (a name -> tensor dict)."""
    d, heads = cfg.hidden_size, cfg.num_attention_heads
    hd = d // heads
    rotary_dim = int(hd * cfg.rotary_percent) // 2 * 2
    norm, eps = cfg.pattention_normalization, cfg.norm_epsilon_pattention
    taus = {"query": math.sqrt(cfg.qkv_num_param_tokens), "key": math.sqrt(cfg.qkv_num_param_tokens),
            "value": math.sqrt(cfg.qkv_num_param_tokens), "dense": math.sqrt(cfg.proj_num_param_tokens),
            "mlp": math.sqrt(cfg.ffn_num_param_tokens)}

    def pat(x, prefix, kind):
        return plain_reference.pattention(x, params[prefix + ".key_param_tokens"],
                                          params[prefix + ".value_param_tokens"], norm, taus[kind], eps)

    def block_ln(x, name):
        if cfg.block_layernorm == "parametric":
            return F.layer_norm(x, (d,), params[name + ".weight"], params[name + ".bias"], cfg.layernorm_epsilon)
        return F.layer_norm(x, (d,), eps=cfg.layernorm_epsilon)

    emb = params["embedding.word_embeddings.weight"][:cfg.vocab_size]
    h = emb[ids]
    b, s = ids.shape
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    for i in range(cfg.num_layers):
        p = f"layers.{i}"
        x = block_ln(h, p + ".input_layernorm")
        q, k, v = (pat(x, f"{p}.attention.{n}", n).view(b, s, heads, hd) for n in ("query", "key", "value"))
        q, k = ref_rotary(q, rotary_dim, cfg.rotary_base), ref_rotary(k, rotary_dim, cfg.rotary_base)
        scores = torch.einsum("bqhc,bkhc->bhqk", q, k) / math.sqrt(hd)
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        context = torch.einsum("bhqk,bkhc->bqhc", probs, v).reshape(b, s, d)
        h = h + pat(context, p + ".attention.dense", "dense")
        h = h + pat(block_ln(h, p + ".post_attention_layernorm"), p + ".mlp", "mlp")
    h = F.layer_norm(h, (d,), params["final_layernorm.weight"], params["final_layernorm.bias"], cfg.layernorm_epsilon)
    losses = F.cross_entropy((h @ emb.T).reshape(b * s, -1), labels.reshape(-1), reduction="none").view(b, s)
    return (losses * loss_mask).sum() / loss_mask.sum()


def batch(cfg, seed=0, b=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (b, cfg.seq_length), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (b, cfg.seq_length), generator=g)
    mask = (torch.rand(b, cfg.seq_length, generator=g) > 0.25).float()
    return ids, labels, mask


def scaled_error(got, ref):
    return (got.double() - ref).abs().max().item() / ref.abs().max().item()


@pytest.mark.parametrize("overrides", [
    {},
    {"pattention_normalization": "gelu_l2_norm", "block_layernorm": "parametric", "rotary_percent": 0.5},
    {"pattention_normalization": "softmax", "rotary_percent": 0.0, "num_layers": 1},
], ids=["default", "gelu_l2_norm-parametric-rotary0.5", "softmax-norotary"])
def test_lm_matches_plain_reference(overrides):
    cfg = tiny_config(**overrides)
    model = TokenformerLM(cfg, seed=7)
    if cfg.block_layernorm == "parametric":  # make the block LayerNorm parameters matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "layernorm" in name and "final" not in name:
                    p.add_(0.1 * torch.randn_like(p))
    ids, labels, mask = batch(cfg)
    loss = model(ids, labels, mask)
    loss.backward()

    params = {n: p.detach().double().requires_grad_() for n, p in model.named_parameters()}
    ref = ref_lm_loss(params, cfg, ids, labels, mask)
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    for name, p in model.named_parameters():
        ref_grad = params[name].grad
        assert ref_grad is not None and ref_grad.abs().max() > 0, name
        assert scaled_error(p.grad, ref_grad) <= 1e-4, (name, scaled_error(p.grad, ref_grad))


def test_logits_checkpointing_and_names():
    cfg = tiny_config()
    model = TokenformerLM(cfg, seed=3)
    ids, labels, mask = batch(cfg, seed=1)
    logits = model(ids)
    assert logits.shape == (2, cfg.seq_length, cfg.padded_vocab_size(1)) == (2, 16, 64)
    assert torch.isinf(logits[..., cfg.vocab_size:]).all() and torch.isfinite(logits[..., :cfg.vocab_size]).all()
    torch.testing.assert_close(model(ids, labels), F.cross_entropy(logits[..., :61].reshape(-1, 61), labels.view(-1)))

    # activation checkpointing recomputes the same function and gradients
    model(ids, labels, mask).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    cfg_ckpt = tiny_config(checkpoint_activations=True)
    model_ckpt = TokenformerLM(cfg_ckpt, seed=3)
    model_ckpt(ids, labels, mask).backward()
    for n, p in model_ckpt.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=0, atol=0)

    names = dict(model.named_parameters())
    assert names["layers.1.attention.dense.key_param_tokens"].shape == (12, 32)
    assert names["layers.0.mlp.value_param_tokens"].shape == (16, 32)
    assert names["embedding.word_embeddings.weight"].shape == (64, 32)
    assert torch.count_nonzero(names["embedding.word_embeddings.weight"][61:]) == 0
    assert model.config.qkv_tau == math.sqrt(8) and cfg.qkv_tau is None  # resolved on a copy
    assert model.layers[0].attention.query.tau == math.sqrt(8)


def test_init_is_deterministic_and_layout_independent():
    a = TokenformerLM(tiny_config(), seed=11)
    b = TokenformerLM(tiny_config(num_layers=3), seed=11)  # construction order / depth does not shift init
    c = TokenformerLM(tiny_config(), seed=12)
    for name, p in a.named_parameters():
        assert torch.equal(p, dict(b.named_parameters())[name]), name
        if "layernorm" not in name:
            assert not torch.equal(p, dict(c.named_parameters())[name]), name
    std = a.layers[0].mlp.value_param_tokens.std().item()
    assert 0.2 < std < 0.4  # value_init=0.3
    wang = tiny_config(value_init="wang").value_init_std()
    assert wang == pytest.approx(2 / (2 * math.sqrt(32)))


def test_bad_config_is_rejected_by_the_model():
    with pytest.raises(ValueError, match="hidden_size \\(30\\) is not divisible by num_attention_heads \\(4\\)"):
        TokenformerLM(tiny_config(hidden_size=30))


@pytest.mark.parametrize("block_layernorm", ["nonparametric", "parametric"])
def test_count_parameters_matches_the_model(block_layernorm):
    from megatron_tokenformer.model.spec import config_parameter_counts

    cfg = tiny_config(block_layernorm=block_layernorm)
    model = TokenformerLM(cfg)
    numel = {part: 0 for part in ("embedding", "attention", "mlp", "layernorm")}
    for name, p in model.named_parameters():
        part = next(k for k in ("layernorm", "embedding", "attention", "mlp") if k in name)
        numel[part] += p.numel()
    counts = config_parameter_counts(cfg, include_padding=True)
    assert {k: counts[k] for k in numel} == numel
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert config_parameter_counts(cfg)["embedding"] == 61 * 32
    assert config_parameter_counts(cfg, include_embedding=False)["total"] == counts["total"] - 64 * 32
