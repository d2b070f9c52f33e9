"""The whole Tokenformer LM at TP = 2 and 4 against TP = 1 on the same seed and batch (spawned gloo processes, CPU).

The TP = 1 references are computed in this (single, non-distributed) process by the TP = 1 model, itself
checked against a plain float64 reference in tests/unit/model/test_language_model.py. Each spawned rank
then rebuilds the model at TP = p and checks: its parameter shards are exact slices of the TP = 1
parameters, the loss matches, every parameter gradient matches the matching slice of the TP = 1
gradient and the logits match, all within 1e-5 (see assert_matches); six variants cover the three
normalisations, parametric LayerNorm, rotary, activation checkpointing, sequence parallelism, every
recomputation mode and the baseline GPT.

The parts have their own TP = 1/2/4 tests against plain references (one place per check): mappings
(test_mappings.py), the RNG tracker (test_random.py), ParallelPattention (test_pattention.py), the
linear and embedding layers and the tied logits (test_layers.py), vocab-parallel cross-entropy
(test_cross_entropy.py), the memory-lean normalisation (tests/unit/ops/test_pattention_norm.py) and the
block (tests/unit/model/test_block.py).

Every check is its own test; all checks of one TP size share one persistent pool of gloo ranks
(tests/helpers/dist_pool.py), so a failing check neither hides the others nor costs a respawn of
the passing ones.
"""

import pytest
import torch

from megatron_tokenformer import parallel_state
from megatron_tokenformer.config import TokenformerConfig
from megatron_tokenformer.model.language_model import TokenformerLM
from tests.helpers import dist_pool

TOL = 1e-5
SEED = 4321
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


def grads_of(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters()}


def params_of(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


# --- TP = 1 references (this process) ---------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    assert not parallel_state.model_parallel_is_initialized()
    ref = {}

    # the whole LM, every variant
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
    assert padded == 52  # make_vocab_size_divisible_by = 1: the vocabulary padding is exercised
    full = torch.cat([r["logits"], torch.full((2, 16, padded - VOCAB), float("-inf"))], dim=-1)
    assert_matches(f"lm {name}: logits", logits, full.chunk(world, dim=-1)[rank])


def check_errors(rank, world):
    heads = world + 1
    with pytest.raises(ValueError, match=f"num_attention_heads \\({heads}\\) is not divisible by the "
                                         f"tensor-model-parallel size \\({world}\\)"):
        TokenformerLM(lm_config(num_attention_heads=heads, hidden_size=8 * heads))
    bad = 18 if world == 4 else 17
    with pytest.raises(ValueError, match=f"ffn_num_param_tokens \\({bad}\\) is not divisible"):
        TokenformerLM(lm_config(ffn_num_param_tokens=bad))


# --- the tests: one per check, each on every rank of the module's pool --------------------------------
tp_pool = dist_pool.pool_fixture(2, 4)


@pytest.mark.parametrize("variant", list(LM_VARIANTS))
def test_lm(tp_pool, reference, variant):
    tp_pool.run(check_lm, reference, variant)


def test_errors(tp_pool):
    tp_pool.run(check_errors)
