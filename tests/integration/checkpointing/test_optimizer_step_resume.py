"""A checkpoint resumed by the other Adam implementation, through DeepSpeed's own (same layout) load.

apex's FusedAdam keeps Adam's step in the param group, torch's AdamW per parameter; which one runs depends
on the machine. Here the (1,1,1) ZeRO-1 checkpoint of a torch-AdamW run (step 10) is loaded by an engine
whose optimizer is a stand-in with apex's layout (tests/unit/checkpointing/test_optimizer_step.py
GroupStepAdamW), trained one step and saved; that save is loaded back by a torch-AdamW engine. Each time the
step must be 10 where the optimizer reads it, 11 after the next update, and the metadata must record the
writer's layout.
"""

import json
import os
import sys

import pytest
import torch.multiprocessing as mp

from tests.helpers import ckpt_runs as R
from tests.helpers import train_runs

pytestmark = pytest.mark.slow


def _worker(rank, port, phases, result_file):
    """``phases``: [(load_dir, save_dir, group_step)], run one after another in this one process (one
    DeepSpeed start-up for both directions)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    sys.path.insert(0, R.ROOT)
    import deepspeed
    import torch

    from megatron_tokenformer import parallel_state
    from megatron_tokenformer.arguments import (
        checkpoint_options,
        core_config_from_args,
        engine_options,
        parse_args,
        validate_args,
    )
    from megatron_tokenformer.checkpoint_args import apply_checkpoint_args
    from megatron_tokenformer.checkpointing import io
    from megatron_tokenformer.checkpointing.format import metadata
    from megatron_tokenformer.tensor_parallel import random as tp_random
    from megatron_tokenformer.training import engine as engine_lib
    from tests.unit.checkpointing.test_optimizer_step import GroupStepAdamW

    torch_optimizer = engine_lib.build_optimizer
    from megatron_tokenformer import deepspeed_boundary
    deepspeed_boundary.skip_cpu_shm_comm_build()  # as pretrain does: no 30-90 s C++ build of an op training never uses
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    parallel_state.initialize_model_parallel(1, 1)
    results = []
    for load_dir, save_dir, group_step in phases:
        args = parse_args(R.ARCH + R.TRAIN + ["--train-iters", "20", "--load", load_dir, "--save", save_dir])
        ckpt = apply_checkpoint_args(args)
        validate_args(args, 1)
        config = core_config_from_args(args, 101, ckpt)
        # the stand-in for apex's FusedAdam (not importable on a CPU machine), or torch's AdamW
        engine_lib.build_optimizer = (lambda a, model: GroupStepAdamW(
            engine_lib.get_param_groups(model, a.weight_decay), lr=a.lr, betas=(a.adam_beta1, a.adam_beta2),
            eps=a.adam_eps, weight_decay=a.weight_decay)) if group_step else torch_optimizer
        tp_random.model_parallel_seed(args.seed)
        engine, _, _ = engine_lib.setup_model_and_optimizer(engine_options(args), config)
        base = engine.optimizer.optimizer
        assert type(base).__name__ == ("GroupStepAdamW" if group_step else "AdamW")
        iteration, consumed = io.load_checkpoint(engine, checkpoint_options(args), config)

        def steps():
            out = []
            for group in base.param_groups:
                states = [base.state[p] for p in group["params"] if base.state.get(p)]
                out.append({"group": group.get("step"),
                            "state": [float(st["step"]) if "step" in st else None for st in states]})
            return out

        after_load = steps()
        g = torch.Generator().manual_seed(0)
        for _ in range(engine.gradient_accumulation_steps()):
            tokens = torch.randint(0, 100, (2, 16), generator=g)
            loss = engine(tokens, torch.roll(tokens, -1, 1), torch.ones(2, 16))
            engine.backward(loss)
            engine.step()
        after_step = steps()
        io.save_checkpoint(engine, checkpoint_options(args), config, iteration + 1, consumed + 4)
        meta = metadata.read_meta(os.path.join(save_dir, f"global_step{iteration + 1}"))
        results.append({"iteration": iteration, "after_load": after_load, "after_step": after_step,
                        "optimizer": meta.get("optimizer")})
    with open(result_file, "w") as f:
        json.dump(results, f)
    torch.distributed.destroy_process_group()


def test_torch_checkpoint_into_apex_layout_and_back(straight_runs, ckpt_workdir):
    _, save = straight_runs((1, 1, 1))
    src = R.checkpoint_at(save, 10, os.path.join(ckpt_workdir, "adam_step_src"))
    with open(os.path.join(src, "global_step10", "tokenformer_checkpoint.json")) as f:
        assert json.load(f)["optimizer"]["adam_step"] == "parameter"  # torch's AdamW wrote it
    group_save = os.path.join(ckpt_workdir, "adam_step_group")
    phases = [(src, group_save, True), (group_save, os.path.join(ckpt_workdir, "adam_step_back"), False)]
    result_file = os.path.join(ckpt_workdir, "adam_step.json")
    mp.spawn(_worker, args=(train_runs.free_port(), phases, result_file), nprocs=1, join=True)
    with open(result_file) as f:
        got, back = json.load(f)
    assert got["iteration"] == 10
    # the stand-in reads the group's step: 10 there, none in the parameter states; 11 after one update
    assert got["after_load"] and all(s["group"] == 10 and set(s["state"]) <= {None} for s in got["after_load"])
    assert all(s["group"] == 11 for s in got["after_step"])
    assert got["optimizer"] == {"class": "tests.unit.checkpointing.test_optimizer_step.GroupStepAdamW",
                                "adam_step": "param_group"}
    # ... and back: torch's AdamW reads the per-parameter step
    assert back["iteration"] == 11
    assert back["after_load"] and all(s["group"] is None and s["state"] == [11.0] for s in back["after_load"])
    assert all(s["state"] == [12.0] for s in back["after_step"])
    assert back["optimizer"]["adam_step"] == "parameter"
