"""The metadata file: build_meta's fields, read_meta's round trip and refusals."""

import json
import os

import pytest

from megatron_tokenformer.checkpointing.format import files, metadata
from megatron_tokenformer.config import TokenformerConfig


def _config():
    return TokenformerConfig(num_layers=2, hidden_size=8, num_attention_heads=2, seq_length=4, vocab_size=11,
                             qkv_num_param_tokens=4, proj_num_param_tokens=4, ffn_num_param_tokens=8).resolve_taus()


def test_build_and_read_round_trip(tmp_path):
    layout = {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 1, "data_parallel_size": 1}
    meta = metadata.build_meta(metadata.KIND_DEEPSPEED, _config(), {"lr": 1e-3}, layout, 5, 20, "/x/t.model", True)
    assert meta["format_version"] == 1 and meta["kind"] == "deepspeed"
    assert (meta["iteration"], meta["consumed_samples"], meta["args"], meta["layout"]) == (5, 20, {"lr": 1e-3}, layout)
    assert meta["tokenizer"] == {"file": "tokenizer.model", "source": "/x/t.model"}
    assert meta["model_config"]["qkv_tau"] == 2.0 and "megatron_tokenformer" in meta["versions"]
    metadata.write_json(os.path.join(tmp_path, files.META_FILE), meta)
    assert metadata.read_meta(str(tmp_path)) == json.loads(json.dumps(meta))
    assert TokenformerConfig.from_dict(metadata.read_meta(str(tmp_path))["model_config"]) == _config()


def test_no_tokenizer_recorded_as_null():
    meta = metadata.build_meta(metadata.KIND_CANONICAL, _config(), {}, {}, 0, 0, None, False)
    assert meta["kind"] == "canonical" and meta["tokenizer"] == {"file": None, "source": None}


def test_read_refusals(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a megatron_tokenformer checkpoint"):
        metadata.read_meta(str(tmp_path))
    path = os.path.join(tmp_path, files.META_FILE)
    with open(path, "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        metadata.read_meta(str(tmp_path))
    with open(path, "w") as f:
        json.dump({"format_version": 2}, f)
    with pytest.raises(ValueError, match="format_version 2 is not supported"):
        metadata.read_meta(str(tmp_path))


def test_jsonable():
    import torch
    assert metadata.jsonable({"a": {1, 3}, "t": torch.tensor(2.5), "o": object}) == \
        {"a": [1, 3], "t": 2.5, "o": repr(object)}
