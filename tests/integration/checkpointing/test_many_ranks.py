"""The tool reads a checkpoint "written by 64 ranks" in one process.

The 64-rank checkpoint is made from a real (2,1,1) one by re-partitioning every ZeRO flat group
over 32 data-parallel ranks the way ZeRO-1/2 lays them out (the flat group padded to a multiple of
2 x DP and cut into DP equal contiguous partitions; each parameter's run recorded per partition),
written with torch.save: 2 model files + 64 optimizer shards. Every tensor the view reads from it
must equal the original's.
"""

import json
import os
import shutil
from collections import OrderedDict

import pytest
import torch

from megatron_tokenformer.checkpointing.expand import ExpandOptions, expand_checkpoint
from megatron_tokenformer.checkpointing.format.view import CheckpointView
from tests.helpers.tamper import record_checksums

pytestmark = pytest.mark.slow


def _repartition(step_dir, out_dir, dp):
    from deepspeed.utils.tensor_fragment import fragment_address  # what DeepSpeed's shards pickle
    shutil.copytree(step_dir, out_dir)
    meta = json.load(open(os.path.join(out_dir, "tokenformer_checkpoint.json")))
    tp = meta["layout"]["tensor_model_parallel_size"]
    assert meta["layout"]["data_parallel_size"] == 1
    for m in range(tp):
        path = os.path.join(out_dir, f"zero_pp_rank_0_mp_rank_{m:02d}_optim_states.pt")
        shard = torch.load(path, weights_only=False)
        os.remove(path)
        osd = shard["optimizer_state_dict"]
        new = [dict(osd, single_partition_of_fp32_groups=[], param_slice_mappings=[],
                    base_optimizer_state={"state": {}, "param_groups": osd["base_optimizer_state"]["param_groups"]})
               for _ in range(dp)]
        for g, flat in enumerate(osd["single_partition_of_fp32_groups"]):
            state = osd["base_optimizer_state"]["state"][g]
            total = -(-flat.numel() // (2 * dp)) * (2 * dp)
            size = total // dp
            padded = {k: torch.nn.functional.pad(v[:flat.numel()], (0, total - flat.numel()))
                      for k, v in [("fp32", flat)] + [(k, state[k]) for k in ("exp_avg", "exp_avg_sq")]}
            # where each parameter lies in the flat group (from the dp=1 mapping)
            spans = [(name, a.start, a.start + a.numel) for name, a in osd["param_slice_mappings"][g].items()]
            for r in range(dp):
                lo, hi = r * size, (r + 1) * size
                mapping = OrderedDict()
                for name, a, b in spans:
                    s, e = max(a, lo), min(b, hi)
                    if s < e:
                        mapping[name] = fragment_address(numel=e - s, start=s - lo)
                new[r]["param_slice_mappings"].append(mapping)
                keep = max(0, min(hi, flat.numel()) - lo)   # DeepSpeed saves the fp32 partition unpadded
                new[r]["single_partition_of_fp32_groups"].append(padded["fp32"][lo:lo + keep].clone())
                new[r]["base_optimizer_state"]["state"][g] = {
                    "step": state["step"], "exp_avg": padded["exp_avg"][lo:hi].clone(),
                    "exp_avg_sq": padded["exp_avg_sq"][lo:hi].clone()}
        for r in range(dp):
            torch.save(dict(shard, optimizer_state_dict=new[r]),
                       os.path.join(out_dir, f"zero_pp_rank_{r}_mp_rank_{m:02d}_optim_states.pt"))
    meta["layout"]["data_parallel_size"] = dp
    meta["layout"]["world_size"] = tp * dp
    json.dump(meta, open(os.path.join(out_dir, "tokenformer_checkpoint.json"), "w"))
    record_checksums(out_dir)  # the checksums a 64-rank save would have recorded for these files


def test_checkpoint_of_64_ranks(straight_runs, ckpt_workdir):
    _, save = straight_runs((2, 1, 1))
    many = os.path.join(ckpt_workdir, "ranks64")
    _repartition(os.path.join(save, "global_step10"), os.path.join(many, "global_step10"), dp=32)
    with open(os.path.join(many, "latest"), "w") as f:
        f.write("global_step10")
    shards = [n for n in os.listdir(os.path.join(many, "global_step10")) if n.startswith("zero_pp_rank")]
    assert len(shards) == 64
    with CheckpointView(os.path.join(save, "global_step10")) as a, \
            CheckpointView(os.path.join(many, "global_step10")) as b:
        assert b.layout["world_size"] == 64
        for name in a.params:
            for key in a.keys:
                assert torch.equal(a.read(name, key), b.read(name, key)), (name, key)
            assert torch.equal(a.read_rows(name, "fp32", 1, 3), b.read_rows(name, "fp32", 1, 3))
    out = os.path.join(ckpt_workdir, "ranks64_to_tp1")
    report = expand_checkpoint(ExpandOptions(load=many, save=out, target_tensor_model_parallel_size=1,
                                             target_data_parallel_size=1), log=lambda m: None)
    assert report["source"]["layout"]["world_size"] == 64
    with CheckpointView(os.path.join(save, "global_step10")) as a, \
            CheckpointView(os.path.join(out, "global_step10")) as c:
        for name in a.params:
            for key in a.keys:
                assert torch.equal(a.read(name, key), c.read(name, key)), (name, key)
    # a shard of the 64 missing: one clear error naming it
    os.remove(os.path.join(many, "global_step10", "zero_pp_rank_17_mp_rank_01_optim_states.pt"))
    with pytest.raises(ValueError, match="zero_pp_rank_17_mp_rank_01_optim_states.pt"):
        CheckpointView(os.path.join(many, "global_step10"))
