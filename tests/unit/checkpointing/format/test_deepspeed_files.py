"""DeepSpeed's on-disk files indexed by plain functions, checked on a folder built with torch.save in
DeepSpeed's layout (tests/helpers/deepspeed_layout.py) against the full tensors it was built from."""

import os

import pytest
import torch

from megatron_tokenformer.checkpointing.format import deepspeed_files as ds
from megatron_tokenformer.checkpointing.format.entries import CheckpointFormatError
from megatron_tokenformer.checkpointing.format.tensor_file import TorchFile
from tests.helpers.deepspeed_layout import HIDDEN, KEYS, META, PARAMS, TP, VOCAB, full, write_folder


def _index(step_dir):
    opened = []

    def open_file(path):
        opened.append(TorchFile(path))
        return opened[-1]
    try:
        return ds.index_deepspeed_step(step_dir, META, open_file), opened
    except BaseException:
        for f in opened:
            f.close()
        raise


def _read(index, name, key):
    """Join the index's local tensors the way DeepSpeed split them (reference assembly, not the view)."""
    entry = index.params[name]
    parts = []
    for local in index.locals[name][key]:
        t = torch.empty(local.shape)
        local.read_range(0, local.numel(), t.view(-1))
        parts.append(t)
    return parts[0] if entry.partition_dim is None else torch.cat(parts, dim=entry.partition_dim)


def test_file_names(tmp_path):
    assert ds.model_states_file("s", 3) == os.path.join("s", "mp_rank_03_model_states.pt")
    assert ds.zero_shard_names("s", 1, 2) == (os.path.join("s", "zero_pp_rank_1_mp_rank_02_optim_states.pt"),
                                              os.path.join("s", "bf16_zero_pp_rank_1_mp_rank_02_optim_states.pt"))
    assert ds.zero_shard_file(str(tmp_path), 0, 0) is None


def test_index_entries(tmp_path):
    write_folder(str(tmp_path))
    index, opened = _index(str(tmp_path))
    try:
        assert list(index.params) == list(PARAMS)
        assert index.params["embedding.word_embeddings.weight"].shape == (VOCAB, HIDDEN)  # padding trimmed
        assert index.params["layers.0.mlp.key_param_tokens"].shape == (3, HIDDEN)
        assert [index.params[n].partition_dim for n in PARAMS] == [0, 1, None]
        assert [index.params[n].vocab for n in PARAMS] == [True, False, False]
        assert all(index.params[n].step == 7.0 for n in PARAMS)
        assert index.state_keys == ["exp_avg", "exp_avg_sq"]
        ts = index.training_state
        assert (ts["iteration"], ts["consumed_samples"], ts["global_steps"], ts["skipped_steps"]) == (7, 28, 7, 1)
        assert ts["lr_scheduler"] == {"num_steps": 7, "max_lr": 1e-3}
    finally:
        for f in opened:
            f.close()


@pytest.mark.parametrize("bf16_names", [False, True])
def test_index_reads_every_tensor(tmp_path, bf16_names):
    write_folder(str(tmp_path), bf16_names=bf16_names)
    index, opened = _index(str(tmp_path))
    try:
        for name in PARAMS:
            assert len(index.locals[name]["fp32"]) == (1 if PARAMS[name][1] is None else TP)
            for key in KEYS:
                assert torch.equal(_read(index, name, key), full(name, key)), (name, key)
    finally:
        for f in opened:
            f.close()


def test_missing_shard_named(tmp_path):
    write_folder(str(tmp_path))
    os.remove(ds.zero_shard_names(str(tmp_path), 1, 1)[0])
    with pytest.raises(CheckpointFormatError, match="zero_pp_rank_1_mp_rank_01_optim_states.pt"):
        _index(str(tmp_path))


def test_missing_model_file_named(tmp_path):
    write_folder(str(tmp_path))
    os.remove(ds.model_states_file(str(tmp_path), 1))
    with pytest.raises(CheckpointFormatError, match="mp_rank_01_model_states.pt"):
        _index(str(tmp_path))


def test_foreign_model_file_refused(tmp_path):
    write_folder(str(tmp_path), wrong_rank=True)
    with pytest.raises(CheckpointFormatError, match="written by pipeline/tensor rank"):
        _index(str(tmp_path))


def test_layout_missing_refused(tmp_path):
    with pytest.raises(CheckpointFormatError, match="layout lacks"):
        ds.index_deepspeed_step(str(tmp_path), {"layout": {}}, TorchFile)


def _write_pipeline_zero0_folder(step_dir):
    """PP = 2, TP = 1, ZeRO-0, fp32: weights in DeepSpeed's layer files (the tied embedding in the client
    state), Adam state in the model files; returns {canonical name: {key: full tensor}}."""
    g = torch.Generator().manual_seed(5)
    want = {"embedding.word_embeddings.weight": (VOCAB, HIDDEN), "layers.0.mlp.key_param_tokens": (3, HIDDEN),
            "layers.1.mlp.key_param_tokens": (3, HIDDEN)}
    want = {n: {k: torch.randn(shape, generator=g) for k in KEYS} for n, shape in want.items()}
    tied = "tied_modules.embed.word_embeddings.weight"
    stages = [[(tied, "embedding.word_embeddings.weight"), ("1.mlp.key_param_tokens", "layers.0.mlp.key_param_tokens")],
              [("2.mlp.key_param_tokens", "layers.1.mlp.key_param_tokens"), (tied, "embedding.word_embeddings.weight")]]
    os.makedirs(step_dir)
    for stage, params in enumerate(stages):
        plist = [{"name": local, "canonical": canon, "shape": list(want[canon]["fp32"].shape), "dtype": "float32",
                  "partition_dim": 0 if "word" in canon else None, "vocab": "word" in canon} for local, canon in params]
        client = {"params": plist, "pipeline_rank": stage, "tensor_rank": 0, "iteration": 2, "consumed_samples": 8,
                  "tied_weights": {tied: want["embedding.word_embeddings.weight"]["fp32"]},
                  "optimizer_groups": [[local for local, _ in params]]}
        state = {i: {"step": torch.tensor(2.0), "exp_avg": want[canon]["exp_avg"],
                     "exp_avg_sq": want[canon]["exp_avg_sq"]}
                 for i, (_, canon) in enumerate(params)}
        torch.save({ds.CLIENT_STATE_KEY: client, "module": None, "optimizer": {"state": state, "param_groups": []},
                    "global_steps": 2, "lr_scheduler": {"num_steps": 2}}, ds.model_states_file(step_dir, stage))
        for local, canon in params:
            if not local.startswith("tied_modules."):
                layer, _, key = local.partition(".")
                torch.save({key: want[canon]["fp32"]}, ds.layer_file(step_dir, int(layer), 0))
    return want


def test_pipeline_zero0_layer_files(tmp_path):
    assert ds.layer_file("s", 3, 1) == os.path.join("s", "layer_03-model_01-model_states.pt")
    step = str(tmp_path / "step")
    want = _write_pipeline_zero0_folder(step)
    meta = {"layout": {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 2, "data_parallel_size": 1,
                       "zero_stage": 0, "precision": "fp32"}, "model_config": {"vocab_size": VOCAB}}
    opened = []
    index = ds.index_deepspeed_step(step, meta, lambda p: opened.append(TorchFile(p)) or opened[-1])
    try:
        assert sorted(index.params) == sorted(want) and index.state_keys == ["exp_avg", "exp_avg_sq"]
        for name, per_key in want.items():
            assert index.params[name].step == 2.0
            for key, t in per_key.items():
                assert torch.equal(_read(index, name, key), t), (name, key)
    finally:
        for f in opened:
            f.close()
    os.remove(ds.layer_file(step, 2, 0))
    with pytest.raises(CheckpointFormatError, match="layer_02-model_00-model_states.pt"):
        ds.index_deepspeed_step(step, meta, TorchFile)
