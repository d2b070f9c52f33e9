"""The baseline Transformer (model_type="transformer"): plain float64 references, pipeline specs, FLOPs,
clear errors, and TP = 2 / 4 against TP = 1 (one test per check on the shared gloo rank pool, CPU).

References are written here from the full TP = 1 weights in a few lines of float64 torch (LayerNorm,
linear layers, rotary, causal softmax attention with an explicit mask, erf-GeLU, tied logits,
cross-entropy); they share no code with the model beyond reading its parameters.
"""

import math

import pytest
import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

from megatron_tokenformer import parallel_state
from megatron_tokenformer.arguments import ArgumentError, core_config_from_args, parse_args, validate_args
from megatron_tokenformer.config import TokenformerConfig
from megatron_tokenformer.model import TokenformerLM
from megatron_tokenformer.model.pipeline import get_layer_specs, pipeline_loss_fn
from megatron_tokenformer.model.transformer import TransformerBlock, transformer_config
from megatron_tokenformer.tensor_parallel import mappings
from megatron_tokenformer.training.flops import training_flops_per_token, transformer_forward_flops_per_token
from tests.helpers import dist_pool

SEED = 2024
VOCAB = 51   # padded to 52 at TP = 2 and 4 (make_vocab_size_divisible_by = 1)
TOL = 1e-5


def tiny_config(**overrides):
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=VOCAB,
                ffn_hidden_size=48, make_vocab_size_divisible_by=1, init_method_std=0.2, value_init=0.2,
                rotary_percent=0.5)
    base.update(overrides)
    return transformer_config(**base)


def batch(seed=7, b=2, s=16):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, s), generator=g)
    labels = torch.randint(0, VOCAB, (b, s), generator=g)
    mask = (torch.rand(b, s, generator=g) > 0.2).float()
    return ids, labels, mask


# --------------------------------------------------------------------------- plain float64 reference
def ref_layernorm(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    return y if weight is None else y * weight + bias


def ref_gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def ref_rotary(x, rotary_dim, base):
    """x [b, s, h, hd]; pairs (j, j + rotary_dim/2) rotated by angle pos * base^(-2j/rotary_dim)."""
    if rotary_dim == 0:
        return x
    half = rotary_dim // 2
    pos = torch.arange(x.shape[1], dtype=x.dtype)[:, None]
    angle = pos * base ** (-2.0 * torch.arange(half, dtype=x.dtype) / rotary_dim)
    cos, sin = angle.cos()[None, :, None, :], angle.sin()[None, :, None, :]
    x1, x2, rest = x[..., :half], x[..., half:rotary_dim], x[..., rotary_dim:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def ref_block(p, prefix, x, cfg):
    """One pre-norm GPT block from a name -> float64 tensor dict."""
    b, s, d = x.shape
    h = cfg.num_attention_heads
    hd = d // h
    rotary_dim = int(hd * cfg.rotary_percent) // 2 * 2

    def lin(t, name):
        return t @ p[f"{prefix}{name}.weight"].T + p[f"{prefix}{name}.bias"]

    def ln(t, name):
        return ref_layernorm(t, p.get(f"{prefix}{name}.weight"), p.get(f"{prefix}{name}.bias"), cfg.layernorm_epsilon)

    y = ln(x, "input_layernorm")
    q, k, v = (lin(y, f"attention.{n}").view(b, s, h, hd) for n in ("query", "key", "value"))
    q, k = ref_rotary(q, rotary_dim, cfg.rotary_base), ref_rotary(k, rotary_dim, cfg.rotary_base)
    scores = torch.einsum("bqhc,bkhc->bhqk", q, k) / math.sqrt(hd)
    future = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)
    probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    context = torch.einsum("bhqk,bkhc->bqhc", probs, v).reshape(b, s, d)
    x = x + lin(context, "attention.dense")
    y = ln(x, "post_attention_layernorm")
    return x + lin(ref_gelu(lin(y, "mlp.dense_h_to_4h")), "mlp.dense_4h_to_h")


def ref_lm_loss(p, cfg, ids, labels, mask):
    emb = p["embedding.word_embeddings.weight"]
    x = emb[ids]
    for i in range(cfg.num_layers):
        x = ref_block(p, f"layers.{i}.", x, cfg)
    x = ref_layernorm(x, p["final_layernorm.weight"], p["final_layernorm.bias"], cfg.layernorm_epsilon)
    logits = x @ emb[:cfg.vocab_size].T
    logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    losses = -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return (losses * mask).sum() / mask.sum()


def float64_params(module):
    return {n: t.detach().double().requires_grad_() for n, t in module.named_parameters()}


def assert_close(what, got, ref, tol=TOL):
    got, ref = got.detach().double(), ref.detach().double()
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    err = ((got - ref).abs() / (1.0 + ref.abs())).max().item()
    assert err <= tol, f"{what}: max |diff| / (1 + |ref|) = {err:.3g} > {tol:g}"


# --------------------------------------------------------------------------- single process
def test_block_matches_plain_reference():
    cfg = TokenformerLM(tiny_config(), seed=SEED).config  # resolved, validated copy
    block = TransformerBlock(cfg, layer_number=2, seed=SEED)
    names = [n for n, _ in block.named_parameters()]
    assert names == ["input_layernorm.weight", "input_layernorm.bias", "attention.query.weight",
                     "attention.query.bias", "attention.key.weight", "attention.key.bias", "attention.value.weight",
                     "attention.value.bias", "attention.dense.weight", "attention.dense.bias",
                     "post_attention_layernorm.weight", "post_attention_layernorm.bias",
                     "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias", "mlp.dense_4h_to_h.weight",
                     "mlp.dense_4h_to_h.bias"]
    # non-trivial LayerNorm and bias values, so the reference exercises them
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, t in block.named_parameters():
            if t.ndim == 1:
                t.add_(0.1 * torch.randn(t.shape, generator=g))
    x = torch.randn(2, 16, 32, generator=g)
    w = torch.randn(2, 16, 32, generator=g)
    xr = x.clone().requires_grad_()
    out = block(xr)
    (out * w).sum().backward()

    p = float64_params(block)
    x64 = x.double().requires_grad_()
    ref = ref_block(p, "", x64, cfg)
    (ref * w.double()).sum().backward()
    assert_close("block output", out, ref)
    assert_close("block input grad", xr.grad, x64.grad)
    for n, t in block.named_parameters():
        assert_close(f"grad {n}", t.grad, p[n].grad)


def test_lm_matches_plain_reference_and_init_statistics():
    cfg = tiny_config(num_layers=3, init_method_std=0.02, value_init="wang", hidden_size=64, ffn_hidden_size=96)
    model = TokenformerLM(cfg, seed=SEED)
    # init: input projections N(0, 0.02^2), output projections N(0, (2 / (L sqrt d))^2), biases 0, LN 1/0
    wang = 2.0 / (3 * math.sqrt(64))
    for n, t in model.named_parameters():
        if n.endswith("bias"):
            assert torch.count_nonzero(t) == 0, n
        elif "layernorm" in n:
            assert torch.equal(t, torch.ones_like(t)), n
        else:
            std = wang if ("dense.weight" in n or "dense_4h_to_h" in n) else 0.02
            assert abs(t.std().item() / std - 1) < 0.1, (n, t.std().item(), std)
    ids, labels, mask = batch()
    loss = model(ids, labels, mask)
    loss.backward()
    p = float64_params(model)
    ref = ref_lm_loss(p, model.config, ids, labels, mask)
    ref.backward()
    assert abs(loss.item() - ref.item()) <= TOL * abs(ref.item())
    for n, t in model.named_parameters():
        assert_close(f"grad {n}", t.grad, p[n].grad)


def test_pipeline_specs_in_sequence_equal_lm():
    cfg = tiny_config()
    specs = get_layer_specs(cfg, seed=SEED)
    tied = specs[0].build()
    blocks = [s.build() for s in specs[1:-1]]
    assert all(isinstance(b, TransformerBlock) for b in blocks[:-1])
    assert [b.canonical_prefix for b in blocks[:-1]] == ["layers.0.", "layers.1."]
    ids, labels, mask = batch()
    x = specs[0].forward_fn(tied, (ids,))
    for layer in blocks:
        x = layer(x)
    loss = pipeline_loss_fn(specs[-1].forward_fn(tied, x), (labels, mask))
    model = TokenformerLM(cfg, seed=SEED)
    assert torch.equal(loss, model(ids, labels, mask))


def test_flops_formula_against_flop_counter():
    """FlopCounterMode counts the matmuls (it leaves out SDPA on CPU): matmuls + 4 T d per layer = formula."""
    d, f, L, T, b = 32, 48, 2, 16, 3
    cfg = tiny_config(hidden_size=d, ffn_hidden_size=f, num_layers=L, seq_length=T)
    model = TokenformerLM(cfg, seed=SEED)
    padded = cfg.padded_vocab_size(1)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(b, T, dtype=torch.long))
    tokens = b * T
    per_token = (counter.get_total_flops() + tokens * L * 4 * T * d) / tokens
    assert per_token == transformer_forward_flops_per_token(L, d, T, padded, f)
    assert per_token == L * (8 * d * d + 4 * d * f + 4 * T * d) + 2 * d * padded
    assert training_flops_per_token(model.config, padded, recompute=False) == 3 * per_token
    assert training_flops_per_token(model.config, padded, recompute=True) == 4 * per_token
    assert transformer_forward_flops_per_token(12, 768, 1024, 50304, 4 * 768) == \
        12 * (24 * 768 ** 2 + 4 * 1024 * 768) + 2 * 768 * 50304


def _args(*extra):
    return parse_args(["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length",
                       "16", "--micro-batch-size", "1", "--train-iters", "1", "--lr", "1e-3", "--mock-data",
                       "--vocab-size", "50", *extra])


def test_arguments_and_config_errors():
    args = validate_args(_args("--model-type", "transformer"), 1)
    cfg = core_config_from_args(args, 51)
    assert (cfg.model_type, cfg.ffn_hidden_size, cfg.block_layernorm) == ("transformer", 128, "parametric")
    args = validate_args(_args("--model-type", "transformer", "--ffn-hidden-size", "40", "--qkv-num-param-tokens",
                               "3", "--tensor-model-parallel-size", "2"), 2)
    assert core_config_from_args(args, 51).ffn_hidden_size == 40  # token counts do not apply to it
    with pytest.raises(ArgumentError, match=r"--ffn-hidden-size \(42\) is not divisible by "
                                            r"--tensor-model-parallel-size \(4\)"):
        validate_args(_args("--model-type", "transformer", "--ffn-hidden-size", "42",
                            "--tensor-model-parallel-size", "4"), 4)
    with pytest.raises(ArgumentError, match="--ffn-hidden-size applies to --model-type transformer only"):
        validate_args(_args("--ffn-hidden-size", "64"), 1)
    with pytest.raises(ValueError, match=r"ffn_hidden_size \(42\) is not divisible by the tensor-model-parallel "
                                         r"size \(4\)"):
        tiny_config(ffn_hidden_size=42).validate(tp=4)
    with pytest.raises(ValueError, match="model_type must be one of"):
        tiny_config(model_type="linear").validate()
    # JSON round trip keeps the baseline's fields
    cfg = tiny_config()
    assert TokenformerConfig.from_dict(cfg.to_dict()) == cfg
    assert TokenformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, seq_length=4, vocab_size=9,
                             qkv_num_param_tokens=2, proj_num_param_tokens=2, ffn_num_param_tokens=2,
                             model_type="transformer").ffn_hidden_size == 32


# --------------------------------------------------------------------------- TP = 2 and 4
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """TP = 1 loss, logits, parameters and gradients of the LM and of one block (this process)."""
    assert not parallel_state.model_parallel_is_initialized()
    model = TokenformerLM(tiny_config(), seed=SEED)
    ids, labels, mask = batch()
    loss = model(ids, labels, mask)
    loss.backward()
    ref = dict(ids=ids, labels=labels, mask=mask, loss=loss.detach(), logits=model(ids).detach(),
               params={n: t.detach().clone() for n, t in model.named_parameters()},
               grads={n: t.grad.clone() for n, t in model.named_parameters()})
    path = tmp_path_factory.mktemp("transformer_tp") / "reference.pt"
    torch.save(ref, path)
    return str(path)


def shard_of(full, param, rank, world):
    """The slice of a TP = 1 tensor this rank's ``param`` holds (vocabulary padded with zeros)."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    dim, size = param.partition_dim, param.shape[param.partition_dim]
    if full.shape[dim] < size * world:
        pad = list(full.shape)
        pad[dim] = size * world - full.shape[dim]
        full = torch.cat([full, torch.zeros(pad, dtype=full.dtype)], dim=dim)
    return full.narrow(dim, rank * size, size)


_REFERENCES = {}


def load_reference(path):
    if path not in _REFERENCES:
        _REFERENCES[path] = torch.load(path)
    return _REFERENCES[path]


def check_init(rank, world, ref_path):
    ref = load_reference(ref_path)
    model = TokenformerLM(tiny_config(), seed=SEED)
    params = dict(model.named_parameters())
    assert sorted(params) == sorted(ref["params"])
    d = 32
    for name, p in params.items():
        assert torch.equal(p.detach(), shard_of(ref["params"][name], p, rank, world)), f"init of {name}"
    # each rank's Q/K/V rows are exactly its heads' rows (head-major): heads [r h/p, (r+1) h/p)
    rows = slice(rank * d // world, (rank + 1) * d // world)
    query = "layers.0.attention.query.weight"
    assert torch.equal(params[query], ref["params"][query][rows])
    assert params["layers.0.attention.dense.weight"].shape == (d, d // world)
    assert params["layers.1.mlp.dense_h_to_4h.weight"].shape == (48 // world, d)
    assert params["layers.1.mlp.dense_4h_to_h.bias"].shape == (d,)


def check_loss_and_grads(rank, world, ref_path):
    ref = load_reference(ref_path)
    model = TokenformerLM(tiny_config(), seed=SEED)
    params = dict(model.named_parameters())
    loss = model(ref["ids"], ref["labels"], ref["mask"])
    loss.backward()
    assert abs(loss.item() - ref["loss"].item()) <= TOL * abs(ref["loss"].item()), (loss.item(), ref["loss"].item())
    for name, p in params.items():
        assert_close(f"TP={world} grad {name}", p.grad, shard_of(ref["grads"][name], p, rank, world))
    # the same loss on every rank of the group
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, loss.detach(), group=parallel_state.get_tensor_model_parallel_group())
    assert all(torch.equal(t, losses[0]) for t in losses)


def check_logits(rank, world, ref_path):
    ref = load_reference(ref_path)
    model = TokenformerLM(tiny_config(), seed=SEED)
    logits = model(ref["ids"])
    padded = model.config.padded_vocab_size(world)
    full = torch.cat([ref["logits"], torch.full((2, 16, padded - VOCAB), float("-inf"))], dim=-1)
    got, want = logits, full.chunk(world, dim=-1)[rank]
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got))
    assert_close("logits", got[finite], want[finite])


def check_block_traffic(rank, world):
    """Forward traffic of one block: Megatron's two all-reduces of [b, s, d], nothing else."""
    d = 32
    model = TokenformerLM(tiny_config(), seed=SEED)
    x = torch.randn(2, 16, d, generator=torch.Generator().manual_seed(5))
    with mappings.count_collectives() as log, torch.no_grad():
        model.layers[0](x)
    assert log == [("all_reduce", 2 * 16 * d), ("all_reduce", 2 * 16 * d)], log


tp_pool = dist_pool.pool_fixture(2, 4)


def test_tensor_parallel_init_is_the_tp1_slice(tp_pool, reference):
    tp_pool.run(check_init, reference)


def test_tensor_parallel_loss_and_grads_match_tp1(tp_pool, reference):
    tp_pool.run(check_loss_and_grads, reference)


def test_tensor_parallel_logits_match_tp1(tp_pool, reference):
    tp_pool.run(check_logits, reference)


def test_tensor_parallel_block_traffic(tp_pool):
    tp_pool.run(check_block_traffic)
