"""Learning-rate schedule against hand-computed values (warmup, then constant / linear / cosine)."""

import math

import pytest
import torch

from megatron_tokenformer.training.lr_schedules import (
    OptimizerParamScheduler,
    ScheduleMismatchError,
    learning_rate,
    reconcile_schedule,
)


def test_warmup_then_linear_decay():
    # max 1.0, min 0.1, 4 warmup updates, decay until update 14
    lrs = [learning_rate(k, 1.0, 0.1, 4, 14, "linear") for k in range(16)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[9] == pytest.approx(0.1 + 0.9 * (1 - 5 / 10))
    assert lrs[14:] == pytest.approx([0.1, 0.1])


def test_cosine_and_constant():
    assert learning_rate(0, 2.0, 0.0, 0, 10, "cosine") == pytest.approx(2.0)
    assert learning_rate(5, 2.0, 0.0, 0, 10, "cosine") == pytest.approx(1.0)
    assert learning_rate(8, 2.0, 0.0, 0, 10, "cosine") == pytest.approx(0.5 * 2.0 * (1 + math.cos(math.pi * 0.8)))
    assert learning_rate(50, 2.0, 0.2, 0, 10, "cosine") == pytest.approx(0.2)
    assert [learning_rate(k, 3.0, 0.0, 2, 10, "constant") for k in (0, 1, 2, 99)] == pytest.approx([1.5, 3, 3, 3])


def test_scheduler_sets_groups_and_resumes():
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    opt = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:], "lr_mult": 0.5}], lr=123.0)
    sched = OptimizerParamScheduler(opt, max_lr=1.0, min_lr=0.0, warmup_steps=2, decay_steps=6,
                                    decay_style="linear")
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5, 0.25])
    for _ in range(3):
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0 - 1 / 4)
    state = sched.state_dict()
    fresh = OptimizerParamScheduler(opt, max_lr=1.0, min_lr=0.0, warmup_steps=2, decay_steps=6,
                                    decay_style="linear")
    fresh.load_state_dict(state)
    assert fresh.get_lr() == pytest.approx(sched.get_lr())
    with pytest.raises(ValueError):
        OptimizerParamScheduler(opt, max_lr=1.0, min_lr=2.0, warmup_steps=0, decay_steps=6, decay_style="linear")


# ---- resume: the checkpoint's schedule against the flags (Megatron's rule)
FLAGS = {"max_lr": 1.0, "min_lr": 0.1, "warmup_steps": 2, "decay_steps": 10, "decay_style": "cosine"}


def _scheduler(**kw):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=99.0)
    return opt, OptimizerParamScheduler(opt, 1.0, 0.1, 2, 10, "cosine", **kw)


def test_reconcile_same_schedule_passes():
    assert reconcile_schedule(FLAGS, dict(FLAGS)) == FLAGS
    assert reconcile_schedule(FLAGS, {}) == FLAGS                      # fields an old checkpoint lacks


def test_reconcile_refuses_listing_every_difference():
    ckpt = dict(FLAGS, max_lr=2.0, decay_steps=20, decay_style="linear")
    with pytest.raises(ScheduleMismatchError) as err:
        reconcile_schedule(FLAGS, ckpt)
    msg = str(err.value)
    assert "\n" not in msg
    assert "--lr 1.0 (checkpoint: 2.0)" in msg and "--lr-decay-style cosine (checkpoint: linear)" in msg
    assert "--lr-decay-iters 10 (checkpoint: 20; it defaults to --train-iters)" in msg
    assert "--min-lr" not in msg and "--lr-warmup-iters" not in msg
    assert "--override-opt-param-scheduler" in msg and "--use-checkpoint-opt-param-scheduler" in msg


def test_reconcile_override_and_use_checkpoint():
    ckpt = dict(FLAGS, max_lr=2.0, warmup_steps=0)
    assert reconcile_schedule(FLAGS, ckpt, override=True) == FLAGS
    assert reconcile_schedule(FLAGS, ckpt, use_checkpoint=True) == ckpt
    with pytest.raises(ValueError, match="exclude each other"):
        reconcile_schedule(FLAGS, ckpt, override=True, use_checkpoint=True)


def test_load_state_dict_refuses_other_schedule():
    opt, sched = _scheduler()
    with pytest.raises(ScheduleMismatchError, match=r"--lr 1.0 \(checkpoint: 3.0\)"):
        sched.load_state_dict(dict(FLAGS, max_lr=3.0, num_steps=4))


def test_load_state_dict_override_keeps_flags_and_step():
    opt, sched = _scheduler(override_opt_param_scheduler=True)
    opt.param_groups[0]["lr"] = 42.0                                   # e.g. restored with the optimizer state
    sched.load_state_dict(dict(FLAGS, max_lr=3.0, num_steps=4))
    want = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (4 - 2) / 8))   # the flags' cosine at update 4
    assert sched.num_steps == 4 and sched.get_lr() == pytest.approx(want)
    assert opt.param_groups[0]["lr"] == pytest.approx(want)


def test_load_state_dict_use_checkpoint_takes_its_schedule():
    opt, sched = _scheduler(use_checkpoint_opt_param_scheduler=True)
    sched.load_state_dict({"max_lr": 3.0, "min_lr": 0.0, "warmup_steps": 0, "decay_steps": 8,
                           "decay_style": "linear", "num_steps": 2})
    assert (sched.max_lr, sched.min_lr, sched.warmup_steps, sched.decay_steps, sched.decay_style) == \
        (3.0, 0.0, 0, 8, "linear")
    assert opt.param_groups[0]["lr"] == pytest.approx(3.0 * (1 - 2 / 8))
    assert sched.state_dict()["max_lr"] == 3.0                          # saved again as the checkpoint's


def test_apply_writes_the_schedule_over_a_stored_lr():
    opt, sched = _scheduler()
    opt.param_groups[0]["lr"] = 42.0
    sched.apply()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)              # warmup: update 0 of 2


def test_both_flags_refused():
    with pytest.raises(ValueError, match="exclude each other"):
        _scheduler(override_opt_param_scheduler=True, use_checkpoint_opt_param_scheduler=True)
