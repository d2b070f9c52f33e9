"""--train-only-new-param-tokens: after a growth only the new parameter tokens (and the final LayerNorm) train.

The reference is the grown checkpoint itself, read as fp32 tensors: after 5 steps at TP 1 (growth x2)
and at TP 2 (growth x4 + reshard 1 -> 2; one rank holds old and new rows, the other only new rows), and
after a resume WITHOUT the flag (the checkpoint records it), every old row of every Pattention and every
other tensor is bitwise the grown checkpoint's, every new row has moved, and the final LayerNorm has moved.
"""

import os

import pytest
import torch

from megatron_tokenformer.checkpointing.expand import ExpandOptions, expand_checkpoint
from megatron_tokenformer.checkpointing.format import metadata
from megatron_tokenformer.checkpointing.format.entries import FP32
from megatron_tokenformer.checkpointing.format.view import CheckpointView
from megatron_tokenformer.checkpointing.grow import pattention_kind
from megatron_tokenformer.training.param_token_freezing import ARG_KEY
from tests.helpers import ckpt_runs as R

pytestmark = pytest.mark.slow
OLD = {"qkv": 16, "proj": 16, "ffn": 32}  # tests.helpers.ckpt_runs.ARCH


def _tensors(step_dir):
    with CheckpointView(step_dir) as view:
        return {name: view.read(name, FP32).clone() for name in view.params}


def _grow(src, dst, tp, factor):
    expand_checkpoint(ExpandOptions(load=src, save=dst, target_tensor_model_parallel_size=tp,
                                    param_token_growth_factor=factor), log=lambda m: None)
    return os.path.join(dst, "global_step10")


def _check_only_new_rows_moved(before, after, factor):
    assert set(before) == set(after)
    for name, old in before.items():
        new = after[name]
        assert new.shape == old.shape, name
        pk = pattention_kind(name)
        if pk is not None:
            n_old = OLD[pk[0]]
            assert old.shape[0] == factor * n_old
            assert torch.equal(new[:n_old], old[:n_old]), f"{name}: an old row changed"
            moved = (new[n_old:] != old[n_old:]).any(dim=1)
            assert bool(moved.all()), f"{name}: new rows {torch.nonzero(~moved).flatten().tolist()} did not move"
        elif name.startswith("final_layernorm."):
            assert not torch.equal(new, old), f"{name} did not train"
        else:
            assert torch.equal(new, old), f"{name} changed"


@pytest.fixture(scope="module")
def grown(straight_runs, ckpt_workdir):
    _, save = straight_runs((1, 1, 1))
    src = R.checkpoint_at(save, 10, os.path.join(ckpt_workdir, "freeze_src"))
    return {1: _grow(src, os.path.join(ckpt_workdir, "freeze_grown_x2_tp1"), 1, 2),
            2: _grow(src, os.path.join(ckpt_workdir, "freeze_grown_x4_tp2"), 2, 4)}


def test_tp1_five_steps_then_resume_without_the_flag(grown, ckpt_workdir):
    before = _tensors(grown[1])
    _, save = R.resume(ckpt_workdir, "freeze_tp1", (1, 1, 1), os.path.dirname(grown[1]), 15, arch=False,
                       extra=["--train-only-new-param-tokens", "--override-opt-param-scheduler"])
    step15 = os.path.join(save, "global_step15")
    assert metadata.read_meta(step15)["args"][ARG_KEY] == {
        "qkv_num_param_tokens": 16, "proj_num_param_tokens": 16, "ffn_num_param_tokens": 32}
    _check_only_new_rows_moved(before, _tensors(step15), 2)
    # (--override-opt-param-scheduler: these runs shorten the source's schedule on purpose)
    # resume from step 15 without the flag: the checkpoint's record keeps the old rows frozen
    _, save2 = R.resume(ckpt_workdir, "freeze_tp1_resumed", (1, 1, 1), save, 18, arch=False,
                        extra=["--override-opt-param-scheduler"])
    _check_only_new_rows_moved(before, _tensors(os.path.join(save2, "global_step18")), 2)


def test_tp2_five_steps(grown, ckpt_workdir):
    before = _tensors(grown[2])
    _, save = R.resume(ckpt_workdir, "freeze_tp2", (2, 1, 1), os.path.dirname(grown[2]), 15, arch=False,
                       extra=["--train-only-new-param-tokens", "--override-opt-param-scheduler"])
    _check_only_new_rows_moved(before, _tensors(os.path.join(save, "global_step15")), 4)


def test_the_flag_needs_a_grown_checkpoint(straight_runs, ckpt_workdir):
    _, save = straight_runs((1, 1, 1))
    proc = R.run((1, 1, 1), R.ARCH + R.TRAIN + ["--train-iters", "12", "--load", save, "--train-only-new-param-tokens"],
                 check=False)
    assert proc.returncode != 0
    assert "--train-only-new-param-tokens needs a checkpoint grown by tools/expand_checkpoint.py" in proc.stderr
    assert "Traceback" not in proc.stderr
