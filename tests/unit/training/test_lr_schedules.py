"""Learning-rate schedule against hand-computed values (warmup, then constant / linear / cosine)."""

import math

import pytest
import torch

from megatron_tokenformer.training.lr_schedules import OptimizerParamScheduler, learning_rate


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
