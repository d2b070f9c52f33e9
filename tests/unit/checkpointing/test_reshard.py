"""Resharding helpers: the target layout rule, and a plain module set from a checkpoint source."""

import pytest
import torch

from megatron_tokenformer.checkpointing import reshard


def test_target_layout_keeps_unset_sizes():
    src = {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 3, "data_parallel_size": 4}
    assert reshard.layout_tuple(src) == (2, 3, 4) and reshard.layout_tuple({}) == (1, 1, 1)
    assert reshard.target_layout(src, tp=1) == {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 3,
                                                "data_parallel_size": 4, "world_size": 12}


def test_target_layout_refuses_zero():
    with pytest.raises(ValueError, match="--target-data-parallel-size must be >= 1, got -1"):
        reshard.target_layout({}, dp=-1)


def test_load_module_from_view(tmp_path):
    """A TokenformerLM (TP = 1) set from a canonical folder equals the tensors written into it."""
    from megatron_tokenformer.checkpointing.format import canonical, metadata
    from megatron_tokenformer.checkpointing.format.entries import ParamEntry
    from megatron_tokenformer.checkpointing.format.view import CheckpointView
    from megatron_tokenformer.config import TokenformerConfig
    from megatron_tokenformer.model import TokenformerLM

    config = TokenformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, seq_length=4, vocab_size=11,
                               qkv_num_param_tokens=4, proj_num_param_tokens=4, ffn_num_param_tokens=8,
                               make_vocab_size_divisible_by=4).resolve_taus()
    model = TokenformerLM(config)
    g = torch.Generator().manual_seed(3)
    step = str(tmp_path / "global_step0")
    w = canonical.CanonicalWriter(step, fsync=False)
    want, entries = {}, []
    for name, p in model.named_parameters():
        vocab = name.startswith("embedding.word_embeddings")
        shape = (config.vocab_size,) + tuple(p.shape[1:]) if vocab else tuple(p.shape)
        want[name] = torch.randn(shape, generator=g)
        w.write(name, "fp32", want[name])
        pdim = getattr(p, "partition_dim", 0) if getattr(p, "tensor_model_parallel", False) else None
        entries.append(ParamEntry(name, shape, "float32", pdim, vocab))
    meta = metadata.build_meta(metadata.KIND_CANONICAL, config, {}, {}, 0, 0, None, False)
    w.finish(dict(meta, params=[e.to_dict() for e in entries], optimizer_state_keys=[], training_state={}))
    with CheckpointView(step) as view:
        reshard.load_module_from_view(model, view, config)
    for name, p in model.named_parameters():
        if name.startswith("embedding.word_embeddings"):      # padded to 12 rows: the padding row is zero
            assert torch.equal(p[:config.vocab_size], want[name]) and not p[config.vocab_size:].any()
        else:
            assert torch.equal(p, want[name]), name
