"""A tiny DeepSpeed ZeRO-1 checkpoint folder at (tp, pp, dp) = (2, 1, 2), built with torch.save in
DeepSpeed's layout from full tensors the tests keep as the reference (:func:`full`)."""

import os

import torch

from megatron_tokenformer.checkpointing.format import deepspeed_files as ds

TP, DP, VOCAB, PADDED, HIDDEN = 2, 2, 5, 6, 4
# canonical name -> (full shape at the padded vocabulary, partition dim or None, vocab flag)
PARAMS = {"embedding.word_embeddings.weight": ((PADDED, HIDDEN), 0, True),
          "layers.0.mlp.key_param_tokens": ((3, HIDDEN), 1, False),
          "final_layernorm.weight": ((HIDDEN,), None, False)}
KEYS = {"fp32": 1.0, "exp_avg": 10.0, "exp_avg_sq": 100.0}


def full(name, key):
    shape = PARAMS[name][0]
    n = int(torch.tensor(shape).prod())
    offset = 1000.0 * list(PARAMS).index(name)
    return (torch.arange(n, dtype=torch.float32) + offset).view(shape) * KEYS[key]


def local(name, key, r):
    whole, (_, pdim, _) = full(name, key), PARAMS[name]
    return whole if pdim is None else whole.chunk(TP, dim=pdim)[r].contiguous()


def write_folder(step_dir, bf16_names=False, wrong_rank=False):
    from deepspeed.utils.tensor_fragment import fragment_address  # the class DeepSpeed's shards pickle
    os.makedirs(step_dir, exist_ok=True)
    for r in range(TP):
        plist = [{"name": f"local.{i}", "canonical": name, "shape": list(local(name, "fp32", r).shape),
                  "dtype": "float32", "partition_dim": PARAMS[name][1], "vocab": PARAMS[name][2]}
                 for i, name in enumerate(PARAMS)]
        client = {"params": plist, "pipeline_rank": 0, "tensor_rank": (1 - r) if wrong_rank else r,
                  "iteration": 7, "consumed_samples": 28}
        torch.save({ds.CLIENT_STATE_KEY: client, "global_steps": 7, "global_samples": 28, "skipped_steps": 1,
                    "lr_scheduler": {"num_steps": 7, "max_lr": 1e-3}}, ds.model_states_file(step_dir, r))
        flats = {key: torch.cat([local(n, key, r).view(-1) for n in PARAMS]) for key in KEYS}
        total = flats["fp32"].numel()
        per = (total + DP - 1) // DP
        for d in range(DP):
            lo, hi = d * per, min(total, (d + 1) * per)
            mapping, pos = {}, 0
            for i, name in enumerate(PARAMS):
                n = local(name, "fp32", r).numel()
                a, b = max(lo, pos), min(hi, pos + n)
                if a < b:
                    mapping[f"local.{i}"] = fragment_address(numel=b - a, start=a - lo)
                pos += n
            osd = {"single_partition_of_fp32_groups": [flats["fp32"][lo:hi].clone()],
                   "base_optimizer_state": {"state": {0: {"step": torch.tensor(7.0),
                                                          "exp_avg": flats["exp_avg"][lo:hi].clone(),
                                                          "exp_avg_sq": flats["exp_avg_sq"][lo:hi].clone()}},
                                            "param_groups": [{"lr": 1e-3}]},
                   "param_slice_mappings": [mapping], "loss_scaler": None}
            path = ds.zero_shard_names(step_dir, d, r)[1 if bf16_names else 0]
            torch.save({"optimizer_state_dict": osd}, path)


# the metadata's layout and model config (only vocab_size matters to the index)
META = {"layout": {"tensor_model_parallel_size": TP, "pipeline_model_parallel_size": 1, "data_parallel_size": DP,
                   "zero_stage": 1, "precision": "fp32"},
        "model_config": {"vocab_size": VOCAB}}


def write_step_folder(step_dir, **kwargs):
    """:func:`write_folder` plus a metadata file, so that CheckpointView can open it."""
    from megatron_tokenformer.checkpointing.format import metadata
    from megatron_tokenformer.checkpointing.format.files import META_FILE
    from megatron_tokenformer.config import TokenformerConfig

    write_folder(step_dir, **kwargs)
    config = TokenformerConfig(num_layers=1, hidden_size=HIDDEN, num_attention_heads=1, seq_length=8,
                               vocab_size=VOCAB, qkv_num_param_tokens=3, proj_num_param_tokens=3,
                               ffn_num_param_tokens=3, make_vocab_size_divisible_by=1)
    meta = metadata.build_meta(metadata.KIND_DEEPSPEED, config, {}, META["layout"], 7, 28, None, False)
    metadata.write_json(os.path.join(step_dir, META_FILE), meta)
    return meta
