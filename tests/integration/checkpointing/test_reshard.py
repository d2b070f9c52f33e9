"""Resharding: any checkpoint to any (TP, PP, DP) layout, optimizer state included.

- DeepSpeed's own loader and its fragment API (safe_get_full_fp32_param / _optimizer_state) are the
  reference for the checkpoint view: after DeepSpeed loads a (2,1,1) checkpoint natively, every
  rank's full fp32 master and Adam moments equal the view's slices.
- The resharding load path (a (2,1,1) checkpoint into a (1,1,2) engine, ZeRO-1 over 2 DP ranks)
  places exactly the view's values (again checked through DeepSpeed's API); saving that engine
  gives a (1,1,2) checkpoint whose every tensor equals the source's.
- Round trip (2,2,1) -> (1,1,1) -> (2,1,2) -> (2,2,1) with tools/expand_checkpoint.py: every model
  and optimizer tensor identical to the original.
- Resharded resume: (2,1,1) for 10 iterations, converted to (1,2,2), 10 more: the losses equal the
  uninterrupted (2,1,1) run within 1e-4 relative.
"""

import os
import sys

import pytest
import torch
import torch.multiprocessing as mp

from megatron_tokenformer.checkpointing.expand import ExpandOptions, expand_checkpoint
from megatron_tokenformer.checkpointing.format.view import CheckpointView
from tests.helpers import ckpt_runs as R
from tests.helpers import train_runs

pytestmark = pytest.mark.slow


def _engine_worker(rank, world, port, layout, load_dir, save_dir, mode, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    sys.path.insert(0, R.ROOT)
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from megatron_tokenformer import parallel_state
    from megatron_tokenformer.arguments import (
        checkpoint_options,
        core_config_from_args,
        engine_options,
        parse_args,
        validate_args,
    )
    from megatron_tokenformer.checkpointing import io
    from megatron_tokenformer.model.naming import canonical_parameter_names
    from megatron_tokenformer.tensor_parallel import random as tp_random
    from megatron_tokenformer.training.engine import setup_model_and_optimizer

    tp, pp, dp = layout
    argv = R.ARCH + R.TRAIN + ["--train-iters", "20", "--tensor-model-parallel-size", str(tp),
                               "--pipeline-model-parallel-size", str(pp), "--load", load_dir, "--save", save_dir]
    args = parse_args(argv)
    from megatron_tokenformer.checkpoint_args import apply_checkpoint_args
    ckpt = apply_checkpoint_args(args)
    validate_args(args, world)
    config = core_config_from_args(args, 101, ckpt)
    from megatron_tokenformer import deepspeed_boundary
    deepspeed_boundary.skip_cpu_shm_comm_build()  # as pretrain does: no 30-90 s C++ build of an op training never uses
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    parallel_state.initialize_model_parallel(tp, pp)
    tp_random.model_parallel_seed(args.seed)
    engine, _, _ = setup_model_and_optimizer(engine_options(args), config)
    iteration, consumed = io.load_checkpoint(engine, checkpoint_options(args), config)
    assert (iteration, consumed) == (10, 40), (iteration, consumed)
    assert engine.global_steps == 10 and engine.lr_scheduler.num_steps == 10

    engine.optimizer._lazy_init_hp_params_optimizer_state()  # DeepSpeed links optimizer-state fragments lazily
    view = CheckpointView(os.path.join(load_dir, "global_step10"))
    names = canonical_parameter_names(engine.module)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    checked = 0
    for name, p in engine.module.named_parameters():
        entry = view.params[names[name]]
        r, w = (tp_rank, tp) if getattr(p, "tensor_model_parallel", False) else (0, 1)
        padded = config.padded_vocab_size(tp) if entry.vocab else None
        for key in ["fp32"] + view.state_keys:
            want = view.read_tp_slice(names[name], key, r, w, padded)
            got = safe_get_full_fp32_param(p) if key == "fp32" else safe_get_full_optimizer_state(p, key)
            assert got is not None, (name, key)
            assert torch.equal(got, want), f"{mode}: {name} {key} differs from the view ({(got - want).abs().max()})"
            checked += 1
        assert torch.equal(p.detach(), view.read_tp_slice(names[name], "fp32", r, w, padded))
    if mode == "reshard-and-save":
        io.save_checkpoint(engine, checkpoint_options(args), config, iteration, consumed)
    view.close()
    with open(os.path.join(result_dir, f"rank{rank}.ok"), "w") as f:
        f.write(str(checked))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _spawn(layout, load_dir, save_dir, mode, result_dir):
    world = layout[0] * layout[1] * layout[2]
    os.makedirs(result_dir, exist_ok=True)
    mp.spawn(_engine_worker, args=(world, train_runs.free_port(), layout, load_dir, save_dir, mode, result_dir),
             nprocs=world, join=True)
    counts = [int(open(os.path.join(result_dir, f"rank{r}.ok")).read()) for r in range(world)]
    assert all(c > 0 for c in counts)


def test_native_load_matches_view(straight_runs, ckpt_workdir):
    """DeepSpeed loads its own (2,1,1) files; its fragment API must agree with our reader."""
    _, save = straight_runs((2, 1, 1))
    src = R.checkpoint_at(save, 10, os.path.join(ckpt_workdir, "native_src"))
    _spawn((2, 1, 1), src, os.path.join(ckpt_workdir, "native_unused"), "native",
           os.path.join(ckpt_workdir, "native_ok"))


def test_reshard_load_into_other_dp_and_save(straight_runs, ckpt_workdir):
    _, save = straight_runs((2, 1, 1))
    src = R.checkpoint_at(save, 10, os.path.join(ckpt_workdir, "rs_src"))
    out = os.path.join(ckpt_workdir, "rs_112")
    _spawn((1, 1, 2), src, out, "reshard-and-save", os.path.join(ckpt_workdir, "rs_ok"))
    with CheckpointView(os.path.join(src, "global_step10")) as a, \
            CheckpointView(os.path.join(out, "global_step10")) as b:
        assert b.layout["data_parallel_size"] == 2 and b.layout["tensor_model_parallel_size"] == 1
        assert list(a.params) == list(b.params) and a.state_keys == b.state_keys
        for name in a.params:
            for key in a.keys:
                assert torch.equal(a.read(name, key), b.read(name, key)), (name, key)
            assert a.params[name].step == b.params[name].step
        for k in ("iteration", "consumed_samples", "global_steps", "lr_scheduler"):
            assert a.training_state[k] == b.training_state[k], k


def _expand(src, dst, layout, **kw):
    tp, pp, dp = layout
    return expand_checkpoint(ExpandOptions(load=src, save=dst, target_tensor_model_parallel_size=tp,
                                           target_pipeline_model_parallel_size=pp, target_data_parallel_size=dp,
                                           **kw), log=lambda m: None)


def test_round_trip(ckpt_workdir):
    _, save = R.train(ckpt_workdir, "rt_221", (2, 2, 1), 3)
    chain = [(1, 1, 1), (2, 1, 2), (2, 2, 1)]
    src = save
    for i, layout in enumerate(chain):
        dst = os.path.join(ckpt_workdir, f"rt_{i}_%d%d%d" % layout)
        report = _expand(src, dst, layout)
        assert report["target"]["layout"]["tensor_model_parallel_size"] == layout[0]
        src = dst
    with CheckpointView(os.path.join(save, "global_step3")) as a, \
            CheckpointView(os.path.join(src, "global_step3")) as b:
        assert b.kind == "canonical" and a.kind == "deepspeed"
        assert b.layout["tensor_model_parallel_size"] == 2 and b.layout["pipeline_model_parallel_size"] == 2
        assert set(a.params) == set(b.params) and len(a.params) > 10
        assert a.state_keys == b.state_keys == ["exp_avg", "exp_avg_sq"]
        for name in a.params:
            assert a.params[name].shape == b.params[name].shape
            assert a.params[name].step == b.params[name].step == 3.0
            for key in a.keys:
                assert torch.equal(a.read(name, key), b.read(name, key)), (name, key)
        for k in ("iteration", "consumed_samples", "global_steps", "lr_scheduler", "skipped_steps"):
            assert a.training_state[k] == b.training_state[k], k
        assert a.config.to_dict() == b.config.to_dict()


def test_resharded_resume(straight_runs, ckpt_workdir):
    ref, save = straight_runs((2, 1, 1))
    dst = os.path.join(ckpt_workdir, "rr_122")
    _expand(R.checkpoint_at(save, 10, os.path.join(ckpt_workdir, "rr_src")), dst, (1, 2, 2))
    got, _ = R.resume(ckpt_workdir, "rr_run", (1, 2, 2), dst, 20)
    assert sorted(got) == list(range(11, 21))
    for it in range(11, 21):
        assert got[it] == pytest.approx(ref[it], rel=1e-4, abs=0), it


def test_fp16_loss_scale_survives_resharding(ckpt_workdir):
    """The dynamic loss scale (here halved on every overflowing step) continues where it stopped."""
    import re
    extra = ["--fp16", "--initial-loss-scale", str(2 ** 32), "--hysteresis", "1"]
    save = os.path.join(ckpt_workdir, "fp16")
    args = R.ARCH + R.TRAIN + extra
    straight = R.run((1, 1, 1), args + ["--train-iters", "5", "--save", save, "--save-interval", "3"])
    scales = [float(s) for s in re.findall(r"loss scale: ([0-9.eE+]+)", straight.stdout)]
    assert len(scales) == 5 and len(set(scales)) > 1
    src = R.checkpoint_at(save, 3, os.path.join(ckpt_workdir, "fp16_at3"))
    dst = os.path.join(ckpt_workdir, "fp16_canonical")
    _expand(src, dst, (1, 1, 1))
    resumed = R.run((1, 1, 1), args + ["--train-iters", "5", "--load", dst])
    assert "through the resharding path" in resumed.stdout
    assert [float(s) for s in re.findall(r"loss scale: ([0-9.eE+]+)", resumed.stdout)] == scales[3:]
