"""TokenformerConfig: validation messages, padding, taus, JSON round trip."""

import json
import math

import pytest

from megatron_tokenformer.config import TokenformerConfig


def make(**overrides):
    base = dict(num_layers=4, hidden_size=64, num_attention_heads=8, seq_length=32, vocab_size=1000,
                qkv_num_param_tokens=16, proj_num_param_tokens=16, ffn_num_param_tokens=64)
    base.update(overrides)
    return TokenformerConfig(**base)


def test_defaults_and_derived_values():
    cfg = make()
    assert cfg.max_position_embeddings == 32
    assert cfg.head_dim == 8 and cfg.rotary_dim == 2
    assert cfg.padded_vocab_size(1) == 1024 and cfg.padded_vocab_size(4) == 1024
    assert make(vocab_size=1025).padded_vocab_size(2) == 1280  # next multiple of 128 * 2
    assert make(make_vocab_size_divisible_by=1, vocab_size=51).padded_vocab_size(4) == 52
    assert cfg.value_init_std() == pytest.approx(2 / (4 * 8))
    assert make(value_init=0.01).value_init_std() == 0.01
    assert make(hidden_size=48, num_attention_heads=4).rotary_dim == 2  # int(12 * 0.25) = 3 -> even 2


def test_resolve_taus_once():
    cfg = make(ffn_tau=2.5).resolve_taus()
    assert (cfg.qkv_tau, cfg.proj_tau, cfg.ffn_tau) == (4.0, 4.0, 2.5)
    cfg.ffn_num_param_tokens = 128  # growing n keeps the tau already resolved
    assert cfg.resolve_taus().ffn_tau == 2.5
    assert make().resolve_taus().ffn_tau == math.sqrt(64)


@pytest.mark.parametrize("overrides, tp, pp, message", [
    ({"hidden_size": 60}, 1, 1, r"hidden_size \(60\) is not divisible by num_attention_heads \(8\)"),
    ({}, 16, 1, r"num_attention_heads \(8\) is not divisible by the tensor-model-parallel size \(16\)"),
    ({"qkv_num_param_tokens": 18}, 4, 1,
     r"qkv_num_param_tokens \(18\) is not divisible by the tensor-model-parallel size \(4\)"),
    ({"proj_num_param_tokens": 6}, 4, 1, r"proj_num_param_tokens \(6\)"),
    ({"ffn_num_param_tokens": 66}, 4, 1, r"ffn_num_param_tokens \(66\)"),
    ({}, 1, 3, r"num_layers \(4\) is not divisible by the pipeline-model-parallel size \(3\)"),
    ({"pattention_normalization": "relu"}, 1, 1, "pattention_normalization must be one of"),
    ({"block_layernorm": "rms"}, 1, 1, "block_layernorm must be one of"),
    ({"model_type": "mamba"}, 1, 1, "model_type must be one of"),
    ({"params_dtype": "int8"}, 1, 1, "params_dtype must be one of"),
    ({"value_init": "xavier"}, 1, 1, "value_init must be 'wang' or a float"),
    ({"seq_length": 64, "max_position_embeddings": 32}, 1, 1, r"seq_length \(64\) exceeds max_position_embeddings"),
    ({"num_layers": 0}, 1, 1, "num_layers must be a positive integer"),
    ({"qkv_tau": -1.0}, 1, 1, "qkv_tau must be a positive number"),
    ({"rotary_percent": 1.5}, 1, 1, "rotary_percent must be in"),
])
def test_validate_errors(overrides, tp, pp, message):
    with pytest.raises(ValueError, match=message):
        make(**overrides).validate(tp, pp)


def test_validate_ok():
    assert make().validate(tp=8, pp=4) is not None


def test_json_round_trip(tmp_path):
    cfg = make(value_init=0.05, pattention_normalization="softmax", checkpoint_activations=True).resolve_taus()
    path = tmp_path / "model_config.json"
    cfg.to_json(path)
    assert json.loads(path.read_text())["qkv_tau"] == 4.0
    assert TokenformerConfig.from_json(path) == cfg
    assert TokenformerConfig.from_dict(cfg.to_dict()) == cfg
    assert not (tmp_path / "model_config.json.tmp").exists()


def test_bad_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not a valid JSON model config"):
        TokenformerConfig.from_json(bad)
    data = make().to_dict()
    data["hiden_size"] = 3
    with pytest.raises(ValueError, match="unknown TokenformerConfig field\\(s\\): hiden_size"):
        TokenformerConfig.from_dict(data)
    del data["hiden_size"], data["vocab_size"]
    with pytest.raises(ValueError, match="missing TokenformerConfig field\\(s\\): vocab_size"):
        TokenformerConfig.from_dict(data)


def test_fused_norm_is_not_stored():
    """A run's kernel choice is not part of the model: a checkpoint written with the fused normalisation
    has the same model_config as one written without it, and loads with it off (and in older readers)."""
    from megatron_tokenformer.config import TokenformerConfig
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=100,
                qkv_num_param_tokens=8, proj_num_param_tokens=8, ffn_num_param_tokens=16)
    fused, plain = TokenformerConfig(**base, fused_pattention_norm=True), TokenformerConfig(**base)
    assert "fused_pattention_norm" not in fused.to_dict() and fused.to_dict() == plain.to_dict()
    assert TokenformerConfig.from_dict(fused.to_dict()) == plain
