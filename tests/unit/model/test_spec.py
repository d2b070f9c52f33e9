"""The model-family specs: the classifier against the built models' own parameter attributes and shapes,
config-derived parameter counts against the models' numel, the registry's errors."""

import dataclasses

import pytest

from megatron_tokenformer.config import MODEL_TYPES, TokenformerConfig
from megatron_tokenformer.model import TokenformerLM
from megatron_tokenformer.model.block import TokenformerBlock
from megatron_tokenformer.model.spec import (
    GROW_NET2NET_WIDTH,
    GROW_PARAM_TOKENS,
    PARAM_KINDS,
    UnknownParameterError,
    config_parameter_counts,
    get_spec,
)
from megatron_tokenformer.model.transformer import TransformerBlock, transformer_config

D, F_MLP, VOCAB = 16, 24, 37


def tokenformer_config(**overrides):
    base = dict(num_layers=2, hidden_size=D, num_attention_heads=2, seq_length=8, vocab_size=VOCAB,
                qkv_num_param_tokens=6, proj_num_param_tokens=4, ffn_num_param_tokens=10,
                make_vocab_size_divisible_by=1)
    base.update(overrides)
    return TokenformerConfig(**base)


def baseline_config():
    return transformer_config(num_layers=2, hidden_size=D, num_attention_heads=2, seq_length=8, vocab_size=VOCAB,
                              ffn_hidden_size=F_MLP, make_vocab_size_divisible_by=1)


CONFIGS = {"tokenformer": tokenformer_config, "transformer": baseline_config}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def built(request):
    cfg = CONFIGS[request.param]()
    return cfg, TokenformerLM(cfg)


def test_registry_has_one_spec_per_model_type():
    assert [get_spec(t).name for t in MODEL_TYPES] == list(MODEL_TYPES)
    assert get_spec(tokenformer_config()).block_class is TokenformerBlock
    assert get_spec(baseline_config()).block_class is TransformerBlock
    assert get_spec(tokenformer_config()).growth_rule == GROW_PARAM_TOKENS
    assert get_spec(baseline_config()).growth_rule == GROW_NET2NET_WIDTH
    with pytest.raises(ValueError, match="model_type must be one of"):
        get_spec("mamba")


def test_config_fields_exist_in_the_config():
    names = {f.name for f in dataclasses.fields(TokenformerConfig)}
    for model_type in MODEL_TYPES:
        fields = get_spec(model_type).config_fields
        assert set(fields.uses) <= names and set(fields.tp_divisible) <= names, model_type


def test_classifier_partition_dim_and_layer_match_the_model(built):
    cfg, model = built
    spec = get_spec(cfg)
    for name, p in model.named_parameters():
        info = spec.classify(name)
        assert info.kind in PARAM_KINDS
        want_dim = p.partition_dim if getattr(p, "tensor_model_parallel", False) else None
        assert info.partition_dim == want_dim, name
        want_layer = int(name.split(".")[1]) if name.startswith("layers.") else None
        assert info.layer == want_layer, name


def test_tokenformer_roles_match_token_counts():
    cfg = tokenformer_config(block_layernorm="parametric")
    spec = get_spec(cfg)
    seen = set()
    for name, p in TokenformerLM(cfg).named_parameters():
        info = spec.classify(name)
        if info.group is not None:
            assert info.role in ("key", "value") and name.endswith(f"{info.role}_param_tokens")
            assert p.shape == (getattr(cfg, spec.token_fields[info.group]), D), name
            assert info.kind == f"{info.group} pattention"
            seen.add((info.group, info.role))
        else:
            assert info.kind in ("embedding", "layernorm"), name
    assert seen == {(g, r) for g in ("qkv", "proj", "ffn") for r in ("key", "value")}


def test_transformer_roles_match_shapes():
    cfg = baseline_config()
    spec = get_spec(cfg)
    shapes = {"square": (D, D), "vector": (D,), "h_to_4h": (F_MLP, D), "mlp_vector": (F_MLP,),
              "4h_to_h": (D, F_MLP), "final_layernorm": (D,), "embedding": (VOCAB, D)}
    for name, p in TokenformerLM(cfg).named_parameters():
        assert tuple(p.shape) == shapes[spec.classify(name).role], name


@pytest.mark.parametrize("spec_type, name", [
    ("tokenformer", "layers.0.attention.query.weight"), ("tokenformer", "layers.0.mlp.dense_h_to_4h.bias"),
    ("transformer", "layers.0.attention.query.key_param_tokens"), ("transformer", "embedding.position.weight"),
    ("tokenformer", "layers.x.mlp.key_param_tokens"),
])
def test_unknown_names_are_refused(spec_type, name):
    with pytest.raises(UnknownParameterError, match=f"is not a parameter of a {spec_type} model"):
        get_spec(spec_type).classify(name)


def test_config_parameter_counts_match_the_model(built):
    cfg, model = built
    numel = {part: 0 for part in ("embedding", "attention", "mlp", "layernorm")}
    for name, p in model.named_parameters():
        part = next(k for k in ("layernorm", "embedding", "attention", "mlp") if k in name)
        numel[part] += p.numel()
    counts = config_parameter_counts(cfg, include_padding=True)
    assert {k: counts[k] for k in numel} == numel
    assert counts["total"] == sum(p.numel() for p in model.parameters())


def test_transformer_counts_by_formula():
    cfg = baseline_config()
    counts = config_parameter_counts(cfg)
    # per block: Q, K, V, O = 4 (d^2 + d); MLP d -> f -> d with biases; two parametric LayerNorms 4d
    assert counts["attention"] == 2 * 4 * (D * D + D)
    assert counts["mlp"] == 2 * (D * F_MLP + F_MLP + F_MLP * D + D)
    assert counts["layernorm"] == 2 * D + 2 * 4 * D
    assert counts["embedding"] == VOCAB * D
