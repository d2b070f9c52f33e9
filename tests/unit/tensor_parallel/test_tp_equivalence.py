"""TP = 2 and 4 against TP = 1 on the same seed and batch (spawned gloo processes, CPU).

The TP = 1 references are computed in this (single, non-distributed) process: plain torch for the
Pattention, embedding/cross-entropy and linear layers, and the TP = 1 block / LM (themselves checked
against a plain float64 reference in tests/unit/model/test_language_model.py). Each spawned rank then
rebuilds the layer at TP = p and checks: its parameter shards are exact slices of the TP = 1
parameters, outputs/losses match, every parameter gradient matches the matching slice of the TP = 1
gradient and input gradients match, all within 1e-5 (see assert_matches).

Every check is its own test; all checks of one TP size share one persistent pool of gloo ranks
(tests/helpers/dist_pool.py), so a failing check neither hides the others nor costs a respawn of
the passing ones.
"""

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_tokenformer import parallel_state
from megatron_tokenformer.config import TokenformerConfig
from megatron_tokenformer.model.block import TokenformerBlock
from megatron_tokenformer.model.language_model import TokenformerLM, language_model_loss, prepare_config
from megatron_tokenformer.model.pattention import Pattention
from megatron_tokenformer.tensor_parallel import mappings
from megatron_tokenformer.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_tokenformer.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear,
                                                         VocabParallelEmbedding, parallel_lm_logits)
from megatron_tokenformer.tensor_parallel.pattention import ParallelPattention
from megatron_tokenformer.tensor_parallel.random import get_rng_tracker, model_parallel_seed
from tests.helpers import dist_pool
from tests.unit.ops.test_pattention_norm import check_tensor_parallel as check_lean_pattention_function

TOL = 1e-5
SEED = 4321
NORMS = ("l2_norm_gelu", "gelu_l2_norm", "softmax")
VOCAB = 51  # padded to 52 at TP = 2 and 4 (make_vocab_size_divisible_by = 1): padding is exercised


def lm_config(**overrides):
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=VOCAB,
                qkv_num_param_tokens=8, proj_num_param_tokens=12, ffn_num_param_tokens=16,
                make_vocab_size_divisible_by=1, init_method_std=0.2, value_init=0.3)
    base.update(overrides)
    return TokenformerConfig(**base)


LM_VARIANTS = {
    "l2_norm_gelu": {},
    "gelu_l2_norm-parametric-ckpt": {"pattention_normalization": "gelu_l2_norm", "block_layernorm": "parametric",
                                     "checkpoint_activations": True},
    "softmax": {"pattention_normalization": "softmax", "rotary_percent": 0.5},
    # sequence parallelism and recomputation change what is kept in memory, not the function: the TP = 1
    # reference (where both have no effect or recompute exactly) must be matched at TP = 2 and 4
    "l2_norm_gelu-sp-selective": {"sequence_parallel": True, "recompute_granularity": "selective"},
    "gelu_l2_norm-parametric-sp-block": {"pattention_normalization": "gelu_l2_norm", "block_layernorm": "parametric",
                                         "sequence_parallel": True, "recompute_granularity": "full",
                                         "recompute_method": "block", "recompute_num_layers": 1},
    "transformer-sp-uniform2": {"model_type": "transformer", "block_layernorm": "parametric", "ffn_hidden_size": 64,
                                "sequence_parallel": True, "recompute_granularity": "full",
                                "recompute_method": "uniform", "recompute_num_layers": 2},
}


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def grads_of(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters()}


def params_of(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


# --- TP = 1 references (this process) ---------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    assert not parallel_state.model_parallel_is_initialized()
    ref = {}

    # Pattention: TP=1 weights from ParallelPattention, outputs/grads from the drop-in module
    x = rand(2, 5, 24, seed=1)
    x[0, 0] = 0.0
    w = rand(2, 5, 20, seed=2)
    for norm in NORMS:
        full = ParallelPattention(24, 20, 16, normalization=norm, key_init_std=0.4, value_init_std=0.5,
                                  seed=SEED, layer_number=3, tag="test")
        plain = Pattention(24, 20, 16, normalization=norm)
        plain.load_state_dict(full.state_dict())
        xr = x.clone().requires_grad_()
        out = plain(xr)
        (out * w).sum().backward()
        ref[f"pattention/{norm}"] = dict(x=x, w=w, params=params_of(full), out=out.detach(), dx=xr.grad,
                                         grads=grads_of(plain))

    # vocab-parallel embedding + tied logits + masked loss, plain torch
    emb = VocabParallelEmbedding(VOCAB, 16, vocab_size=VOCAB, init_std=0.5, seed=SEED, tag="test.emb")
    weight = emb.weight.detach().clone().requires_grad_()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (2, 8), generator=g)
    ids[0, 0], ids[1, 1] = VOCAB - 1, 0
    labels = torch.randint(0, VOCAB, (2, 8), generator=g)
    mask = (torch.rand(2, 8, generator=g) > 0.3).float()
    hidden = torch.tanh(F.embedding(ids, weight)) * 2.0
    logits = hidden @ weight.T
    losses = F.cross_entropy(logits.view(-1, VOCAB), labels.view(-1), reduction="none").view(2, 8)
    loss = (losses * mask).sum() / mask.sum()
    loss.backward()
    ref["embedding"] = dict(ids=ids, labels=labels, mask=mask, weight=weight.detach(), logits=logits.detach(),
                            loss=loss.detach(), grad=weight.grad)

    # vocab-parallel cross-entropy alone, on a padded-size logit tensor
    full_logits = (rand(3, 7, 52, seed=4) * 3).requires_grad_()
    targets = torch.randint(0, 52, (3, 7), generator=g)
    weights = rand(3, 7, seed=5)
    ce = F.cross_entropy(full_logits.view(-1, 52), targets.view(-1), reduction="none").view(3, 7)
    (ce * weights).sum().backward()
    ref["cross_entropy"] = dict(logits=full_logits.detach(), targets=targets, weights=weights, losses=ce.detach(),
                                grad=full_logits.grad)

    # column -> GeLU -> row parallel linear, plain torch
    col = ColumnParallelLinear(16, 24, seed=SEED, tag="test.col", init_std=0.3)
    row = RowParallelLinear(24, 12, seed=SEED, tag="test.row", init_std=0.3)
    biases = (rand(24, seed=6), rand(12, seed=7))
    wc = col.weight.detach().clone().requires_grad_()
    wr = row.weight.detach().clone().requires_grad_()
    bc, br = biases[0].clone().requires_grad_(), biases[1].clone().requires_grad_()
    xl = rand(4, 16, seed=8).requires_grad_()
    out = F.linear(F.gelu(F.linear(xl, wc, bc)), wr, br)
    (out * rand(4, 12, seed=9)).sum().backward()
    ref["linear"] = dict(x=xl.detach(), biases=biases, out=out.detach(), dx=xl.grad,
                         params={"col.weight": wc.detach(), "row.weight": wr.detach()},
                         grads={"col.weight": wc.grad, "col.bias": bc.grad, "row.weight": wr.grad, "row.bias": br.grad})

    # one full block (TP = 1 model code)
    cfg = prepare_config(lm_config())
    block = TokenformerBlock(cfg, layer_number=2, seed=SEED)
    xb = rand(2, 16, 32, seed=10).requires_grad_()
    wb = rand(2, 16, 32, seed=11)
    out = block(xb)
    (out * wb).sum().backward()
    ref["block"] = dict(x=xb.detach(), w=wb, out=out.detach(), dx=xb.grad, params=params_of(block),
                        grads=grads_of(block))

    # the whole LM, three variants
    for name, overrides in LM_VARIANTS.items():
        cfg = lm_config(**overrides)
        model = TokenformerLM(cfg, seed=SEED)
        g = torch.Generator().manual_seed(12)
        ids = torch.randint(0, VOCAB, (2, 16), generator=g)
        labels = torch.randint(0, VOCAB, (2, 16), generator=g)
        mask = (torch.rand(2, 16, generator=g) > 0.2).float()
        loss = model(ids, labels, mask)
        loss.backward()
        ref[f"lm/{name}"] = dict(ids=ids, labels=labels, mask=mask, loss=loss.detach(), params=params_of(model),
                                 grads=grads_of(model), logits=model(ids).detach())

    path = tmp_path_factory.mktemp("tp_reference") / "reference.pt"
    torch.save(ref, path)
    return str(path)


# --- helpers used on the ranks ----------------------------------------------------------------------
# The tolerance, 1e-5, is applied elementwise (|got - ref| <= 1e-5 + 1e-5 |ref|, torch.isclose's
# rule). A second guard keeps tiny tensors honest: the relative error of the whole tensor
# ||got - ref|| / ||ref|| must stay below 1e-4. (It cannot be 1e-5: the fp32 TP = 1 gradient itself is
# up to 2.3e-5 away from float64 in that norm, e.g. layers.1.attention.key values of the softmax LM.)
NORM_TOL = 1e-4


def assert_matches(what, got, ref, tol=TOL, norm_tol=NORM_TOL):
    """Elementwise isclose within ``tol`` and whole-tensor relative error within ``norm_tol``;
    infinities (vocabulary padding) must match exactly."""
    got, ref = got.detach().double(), ref.detach().double()
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    finite = torch.isfinite(ref)
    assert torch.equal(finite, torch.isfinite(got)) and torch.equal(got[~finite], ref[~finite]), f"{what}: inf pattern"
    diff = got[finite] - ref[finite]
    err = (diff.abs() / (1.0 + ref[finite].abs())).max().item()
    rel = diff.norm().item() / max(ref[finite].norm().item(), 1e-30)
    assert err <= tol and rel <= norm_tol, (f"{what}: max |diff| / (1 + |ref|) {err:.3g} (tolerance {tol:g}), "
                                            f"relative error {rel:.3g} (tolerance {norm_tol:g})")


def shard_of(full, param, rank, world):
    """The slice of a TP = 1 tensor that ``param`` holds on this rank (zero-padding the vocabulary)."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    size = param.shape[dim]
    if full.shape[dim] < size * world:  # vocabulary padding
        pad_shape = list(full.shape)
        pad_shape[dim] = size * world - full.shape[dim]
        full = torch.cat([full, torch.zeros(pad_shape, dtype=full.dtype)], dim=dim)
    return full.narrow(dim, rank * size, size)


def check_module(what, module, ref_params, ref_grads, rank, world):
    """Shards are exact slices of the TP=1 parameters; gradients match the slices of the TP=1 gradients."""
    names = dict(module.named_parameters())
    assert sorted(names) == sorted(ref_params), f"{what}: parameter names differ"
    for name, p in names.items():
        expected = shard_of(ref_params[name], p, rank, world)
        assert torch.equal(p.detach(), expected), f"{what}: init of {name} is not the TP=1 slice"
        assert_matches(f"{what}: grad {name}", p.grad, shard_of(ref_grads[name], p, rank, world))


_REFERENCES = {}


def load_reference(path):
    """The TP = 1 references, loaded once per rank process."""
    if path not in _REFERENCES:
        _REFERENCES[path] = torch.load(path)
    return _REFERENCES[path]


def check_mappings(rank, world):
    base = torch.arange(12.0).view(2, 6) + 1.0
    x = (base * (rank + 1)).requires_grad_()
    total = base * sum(r + 1 for r in range(world))  # sum over ranks
    c = 6 // world if 6 % world == 0 else None
    up = torch.full((2, 6), float(rank + 1))

    y = mappings.copy_to_tensor_model_parallel_region(x)
    (y * up).sum().backward()
    assert torch.equal(y, x) and torch.equal(x.grad, torch.full((2, 6), float(sum(range(1, world + 1)))))
    x.grad = None
    y = mappings.reduce_from_tensor_model_parallel_region(x)
    (y * up).sum().backward()
    assert torch.equal(y, total) and torch.equal(x.grad, up)
    x.grad = None
    y = mappings.all_reduce_norm(x)
    (y * up).sum().backward()
    assert torch.equal(y, total) and torch.equal(x.grad, torch.full((2, 6), float(sum(range(1, world + 1)))))
    assert torch.equal(mappings.all_reduce_max_no_grad(x), base * world)
    if c is not None:
        x.grad = None
        y = mappings.scatter_to_tensor_model_parallel_region(x)
        assert torch.equal(y, x[:, rank * c:(rank + 1) * c])
        (y * up[:, :c]).sum().backward()  # x is replicated: its gradient gathers every rank's block
        assert torch.equal(x.grad, torch.cat([torch.full((2, c), float(r + 1)) for r in range(world)], dim=1))
        # reduce-scatter: this rank's block of the sum; backward all-gathers
        x.grad = None
        y = mappings.reduce_scatter_to_tensor_model_parallel_region(x)
        assert torch.equal(y, total[:, rank * c:(rank + 1) * c])
        (y * up[:, :c]).sum().backward()
        assert torch.equal(x.grad, torch.cat([torch.full((2, c), float(r + 1)) for r in range(world)], dim=1))
        # gather: all blocks; backward split (replicated grads) or reduce-scatter (partial grads)
        blocks = (base[:, :c] + 10 * rank).requires_grad_()
        full = torch.cat([base[:, :c] + 10 * r for r in range(world)], dim=1)
        for partial in (False, True):
            blocks.grad = None
            y = mappings.gather_from_tensor_model_parallel_region(blocks, output_grad_is_partial=partial)
            assert torch.equal(y, full)
            (y * torch.arange(6.0) * (rank + 1)).sum().backward()
            grad_block = torch.arange(6.0)[rank * c:(rank + 1) * c].expand(2, c)
            scale = sum(r + 1 for r in range(world)) if partial else rank + 1
            assert torch.equal(blocks.grad, grad_block * scale), partial
    # the counter saw every collective, with element counts
    with mappings.count_collectives() as log:
        mappings.reduce_from_tensor_model_parallel_region(x)
        mappings.all_reduce_max_no_grad(x[0])
    assert log == [("all_reduce", 12), ("all_reduce_max", 6)]


def check_rng_tracker(rank, world):
    group = parallel_state.get_tensor_model_parallel_group()
    model_parallel_seed(99)
    same = torch.rand(5)
    with get_rng_tracker().fork():
        different = torch.rand(5)
    after = torch.rand(5)
    for tensor, equal in ((same, True), (different, False), (after, True)):
        gathered = [torch.empty(5) for _ in range(world)]
        dist.all_gather(gathered, tensor, group=group)
        assert all(torch.equal(g, gathered[0]) for g in gathered) == equal
    torch.manual_seed(99)
    torch.rand(5)
    assert torch.equal(torch.rand(5), after), "fork must not advance the default generator"


def check_pattention(rank, world, ref_path, norm):
    r = load_reference(ref_path)[f"pattention/{norm}"]
    layer = ParallelPattention(24, 20, 16, normalization=norm, key_init_std=0.4, value_init_std=0.5,
                               seed=SEED, layer_number=3, tag="test")
    assert layer.key_param_tokens.shape == (16 // world, 24)
    x = r["x"].clone().requires_grad_()
    out = layer(x)
    (out * r["w"]).sum().backward()
    assert_matches(f"pattention {norm}: output", out, r["out"])
    assert_matches(f"pattention {norm}: input grad", x.grad, r["dx"])
    check_module(f"pattention {norm}", layer, r["params"], r["grads"], rank, world)


def check_embedding(rank, world, ref_path):
    r = load_reference(ref_path)["embedding"]
    padded = lm_config().padded_vocab_size(world)
    assert padded == 52
    emb = VocabParallelEmbedding(padded, 16, vocab_size=VOCAB, init_std=0.5, seed=SEED, tag="test.emb")
    hidden = torch.tanh(emb(r["ids"])) * 2.0
    logits = parallel_lm_logits(hidden, emb)
    loss = language_model_loss(logits, r["labels"], r["mask"])
    loss.backward()
    assert abs(loss.item() - r["loss"].item()) <= TOL * abs(r["loss"].item())
    full_logits = torch.cat([r["logits"], torch.full((2, 8, padded - VOCAB), float("-inf"))], dim=-1)
    assert_matches("vocab-parallel logits", logits, full_logits.chunk(world, dim=-1)[rank])
    check_module("embedding", emb, {"weight": r["weight"]}, {"weight": r["grad"]}, rank, world)


def check_cross_entropy(rank, world, ref_path):
    r = load_reference(ref_path)["cross_entropy"]
    local = r["logits"].chunk(world, dim=-1)[rank].clone().requires_grad_()
    losses = vocab_parallel_cross_entropy(local, r["targets"])
    (losses * r["weights"]).sum().backward()
    assert_matches("cross-entropy losses", losses, r["losses"])
    assert_matches("cross-entropy logit grad", local.grad, r["grad"].chunk(world, dim=-1)[rank])


def check_linear(rank, world, ref_path):
    r = load_reference(ref_path)["linear"]
    col = ColumnParallelLinear(16, 24, seed=SEED, tag="test.col", init_std=0.3)
    row = RowParallelLinear(24, 12, seed=SEED, tag="test.row", init_std=0.3)
    with torch.no_grad():
        col.bias.copy_(r["biases"][0].chunk(world)[rank])
        row.bias.copy_(r["biases"][1])
    x = r["x"].clone().requires_grad_()
    out = row(F.gelu(col(x)))
    (out * rand(4, 12, seed=9)).sum().backward()
    assert_matches("linear: output", out, r["out"])
    assert_matches("linear: input grad", x.grad, r["dx"])
    for name, p in (("col.weight", col.weight), ("row.weight", row.weight)):
        assert torch.equal(p.detach(), shard_of(r["params"][name], p, rank, world)), name
    for name, p in (("col.weight", col.weight), ("col.bias", col.bias), ("row.weight", row.weight),
                    ("row.bias", row.bias)):
        assert_matches(f"linear: grad {name}", p.grad, shard_of(r["grads"][name], p, rank, world))
    gathered = ColumnParallelLinear(16, 24, seed=SEED, tag="test.col", init_std=0.3, gather_output=True, bias=False)
    assert_matches("column gather_output", gathered(r["x"]), F.linear(r["x"], r["params"]["col.weight"]))


def check_block(rank, world, ref_path):
    r = load_reference(ref_path)["block"]
    cfg = prepare_config(lm_config())
    block = TokenformerBlock(cfg, layer_number=2, seed=SEED)
    x = r["x"].clone().requires_grad_()
    out = block(x)
    (out * r["w"]).sum().backward()
    assert_matches("block: output", out, r["out"])
    assert_matches("block: input grad", x.grad, r["dx"])
    check_module("block", block, r["params"], r["grads"], rank, world)


def check_lm(rank, world, ref_path, name):
    r = load_reference(ref_path)[f"lm/{name}"]
    model = TokenformerLM(lm_config(**LM_VARIANTS[name]), seed=SEED)
    if LM_VARIANTS[name].get("sequence_parallel"):  # the residual stream really is split along the sequence
        assert model.embedding(r["ids"]).shape == (2, 16 // world, 32)
    loss = model(r["ids"], r["labels"], r["mask"])
    loss.backward()
    assert abs(loss.item() - r["loss"].item()) <= TOL * abs(r["loss"].item()), (name, loss.item(), r["loss"].item())
    check_module(f"lm {name}", model, r["params"], r["grads"], rank, world)
    logits = model(r["ids"])
    padded = model.config.padded_vocab_size(world)
    full = torch.cat([r["logits"], torch.full((2, 16, padded - VOCAB), float("-inf"))], dim=-1)
    assert_matches(f"lm {name}: logits", logits, full.chunk(world, dim=-1)[rank])


def check_errors(rank, world):
    with pytest.raises(ValueError, match=f"num_param_tokens \\({world + 1}\\) is not divisible by the "
                                         f"tensor-model-parallel size \\({world}\\)"):
        ParallelPattention(8, 8, world + 1)
    heads = world + 1
    with pytest.raises(ValueError, match=f"num_attention_heads \\({heads}\\) is not divisible by the "
                                         f"tensor-model-parallel size \\({world}\\)"):
        TokenformerLM(lm_config(num_attention_heads=heads, hidden_size=8 * heads))
    bad = 18 if world == 4 else 17
    with pytest.raises(ValueError, match=f"ffn_num_param_tokens \\({bad}\\) is not divisible"):
        TokenformerLM(lm_config(ffn_num_param_tokens=bad))


# --- the tests: one per check, each on every rank of the module's pool --------------------------------
tp_pool = dist_pool.pool_fixture(2, 4)


def test_mappings(tp_pool):
    tp_pool.run(check_mappings)


def test_rng_tracker(tp_pool):
    tp_pool.run(check_rng_tracker)


@pytest.mark.parametrize("norm", NORMS)
def test_pattention(tp_pool, reference, norm):
    tp_pool.run(check_pattention, reference, norm)


def test_lean_pattention_function(tp_pool):
    tp_pool.run(check_lean_pattention_function)


def test_embedding_and_tied_logits(tp_pool, reference):
    tp_pool.run(check_embedding, reference)


def test_cross_entropy(tp_pool, reference):
    tp_pool.run(check_cross_entropy, reference)


def test_linear(tp_pool, reference):
    tp_pool.run(check_linear, reference)


def test_block(tp_pool, reference):
    tp_pool.run(check_block, reference)


@pytest.mark.parametrize("variant", list(LM_VARIANTS))
def test_lm(tp_pool, reference, variant):
    tp_pool.run(check_lm, reference, variant)


def test_errors(tp_pool):
    tp_pool.run(check_errors)
