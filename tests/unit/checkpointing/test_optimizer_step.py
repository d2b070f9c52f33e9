"""The Adam step written by a resharded load lands where the optimizer in use reads it
(checkpointing/optimizer_step.py): ``state["step"]`` for torch's AdamW, ``param_group["step"]`` for
apex/DeepSpeed FusedAdam -- checked with a stand-in optimizer that keeps the step in the group."""

import math

import pytest
import torch

from megatron_tokenformer.checkpointing.optimizer_step import get_adam_step, keeps_step_in_param_group, set_adam_step


class GroupStepAdamW(torch.optim.Optimizer):
    """AdamW whose bias correction reads ``group["step"]`` (as apex's FusedAdam does) and ignores
    ``state["step"]``. Declares it (``step_in_param_group``); apex's class is recognised by name instead."""

    step_in_param_group = True

    def __init__(self, params, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            t = group["step"]
            b1, b2 = group["betas"]
            for p in group["params"]:
                st = self.state[p]
                if "exp_avg" not in st:
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                st["exp_avg"].mul_(b1).add_(p.grad, alpha=1 - b1)
                st["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                m_hat = st["exp_avg"] / (1 - b1 ** t)
                v_hat = st["exp_avg_sq"] / (1 - b2 ** t)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.sub_(group["lr"] * m_hat / (v_hat.sqrt() + group["eps"]))


GRADS = [torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0.4, -0.8, 1.5]), torch.tensor([0.3, -1.2, 1.0]),
         torch.tensor([0.6, -0.9, 1.8])]


def _run(opt_cls, steps, param=None, opt=None):
    param = param if param is not None else torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    opt = opt or opt_cls([param], lr=1e-2, betas=(0.9, 0.95))
    for g in steps:
        param.grad = g.clone()
        opt.step()
    return param, opt


def _resume(opt_cls, trained_param, trained_opt, write_step):
    """A fresh optimizer given the moments (as the resharded load does) and the step via ``write_step``."""
    param = torch.nn.Parameter(trained_param.detach().clone())
    opt = opt_cls([param], lr=1e-2, betas=(0.9, 0.95))
    old = trained_opt.state[trained_param]
    st = opt.state[param]
    st["exp_avg"] = old["exp_avg"].clone()
    st["exp_avg_sq"] = old["exp_avg_sq"].clone()
    write_step(opt, st)
    return param, opt


@pytest.mark.parametrize("opt_cls", [GroupStepAdamW, torch.optim.AdamW])
def test_resumed_update_equals_the_uninterrupted_one(opt_cls):
    reference, _ = _run(opt_cls, GRADS)  # four steps in one go
    param, opt = _run(opt_cls, GRADS[:3])
    param, opt = _resume(opt_cls, param, opt, lambda o, st: set_adam_step(o, 0, st, 3))
    _run(opt_cls, GRADS[3:], param, opt)
    torch.testing.assert_close(param.detach(), reference.detach(), rtol=0, atol=1e-7)


def test_step_in_the_state_is_ignored_by_a_group_step_optimizer():
    """The old behaviour (always state["step"]): the stand-in restarts bias correction at step 1 and the
    first update after the load is ~2x the uninterrupted one."""
    reference, _ = _run(GroupStepAdamW, GRADS)
    before, opt = _run(GroupStepAdamW, GRADS[:3])
    start = before.detach().clone()
    param, opt = _resume(GroupStepAdamW, before, opt,
                         lambda o, st: st.__setitem__("step", torch.tensor(3.0)))
    _run(GroupStepAdamW, GRADS[3:], param, opt)
    ratio = ((param.detach() - start).norm() / (reference.detach() - start).norm()).item()
    b1, b2, t = 0.9, 0.95, 4
    # bias corrections of step 1 instead of step 4: (1 - b1^4)/(1 - b1) / sqrt((1 - b2^4)/(1 - b2)) ~ 1.74
    expected = (1 - b1 ** t) / (1 - b1) / math.sqrt((1 - b2 ** t) / (1 - b2))
    assert ratio == pytest.approx(expected, rel=0.05)


def test_known_group_step_classes_are_recognised_without_apex():
    undeclared = {"step_in_param_group": False}
    fused = type("FusedAdam", (GroupStepAdamW,), dict(undeclared, __module__="apex.optimizers.fused_adam"))
    ds_fused = type("FusedAdam", (GroupStepAdamW,), dict(undeclared, __module__="deepspeed.ops.adam.fused_adam"))
    p = torch.nn.Parameter(torch.zeros(2))
    assert keeps_step_in_param_group(fused([p]))  # before its first step: no "step" in the group yet
    assert keeps_step_in_param_group(ds_fused([p]))
    assert not keeps_step_in_param_group(torch.optim.AdamW([p]))
    assert keeps_step_in_param_group(GroupStepAdamW([p]))  # declared


def test_set_adam_step_places_the_step():
    p = torch.nn.Parameter(torch.zeros(2))
    group_opt = type("FusedAdam", (GroupStepAdamW,), {"__module__": "apex.optimizers",
                                                     "step_in_param_group": False})([p])
    st = {"step": torch.tensor(9.0)}
    set_adam_step(group_opt, 0, st, 7)
    assert group_opt.param_groups[0]["step"] == 7 and "step" not in st
    torch_opt = torch.optim.AdamW([p])
    st = {}
    set_adam_step(torch_opt, 0, st, 7)
    assert st["step"].dtype == torch.float32 and st["step"].item() == 7.0 and "step" not in torch_opt.param_groups[0]


def test_get_adam_step_reads_either_place():
    assert get_adam_step({"step": 5}, {"exp_avg": 0}) == 5  # apex checkpoint
    assert get_adam_step({"lr": 1}, {"step": 4}) == 4  # torch checkpoint
    assert get_adam_step(None, {}) is None


# --- a whole optimizer state loaded by the other implementation (DeepSpeed's same-layout load) ----------
from megatron_tokenformer.checkpointing.optimizer_step import (  # noqa: E402
    STEP_IN_PARAM_GROUP,
    STEP_PER_PARAMETER,
    adam_step_conversion,
    convert_loaded_adam_step,
    convert_state_dict_step,
    describe_optimizer,
    saved_step_layout,
    step_layout,
)


def _two_params():
    return [torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0])), torch.nn.Parameter(torch.tensor([-1.0, 0.5, 0.25]))]


def _train(opt_cls, grads, params=None):
    params = params or _two_params()
    opt = opt_cls([{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.95))
    for g in grads:
        for i, p in enumerate(params):
            p.grad = g.clone() * (i + 1)
        opt.step()
    return params, opt


def _load_into(opt_cls, params, state_dict, saved):
    """A fresh ``opt_cls`` on copies of ``params`` given ``state_dict`` through ``load_state_dict`` (what
    DeepSpeed's load calls) inside the conversion. Returns the copies and the optimizer."""
    import copy
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    _, opt = _train(opt_cls, [], copies)
    given = copy.deepcopy(state_dict)
    with adam_step_conversion(opt, saved):
        opt.load_state_dict(given)
    assert "load_state_dict" not in vars(opt)  # the class method again
    assert given["param_groups"] == state_dict["param_groups"]  # the caller's dict is not modified
    return copies, opt


@pytest.mark.parametrize("writer, reader", [(GroupStepAdamW, torch.optim.AdamW), (torch.optim.AdamW, GroupStepAdamW),
                                            (GroupStepAdamW, GroupStepAdamW),
                                            (torch.optim.AdamW, torch.optim.AdamW)])
@pytest.mark.parametrize("recorded", [True, False])  # False: a checkpoint from before the metadata field
def test_resume_by_the_other_implementation_continues_the_bias_correction(writer, reader, recorded):
    reference, _ = _train(writer, GRADS)  # four steps without interruption
    params, opt = _train(writer, GRADS[:3])
    saved = describe_optimizer(opt)["adam_step"] if recorded else None
    copies, resumed = _load_into(reader, params, opt.state_dict(), saved)
    where_here = step_layout(reader([torch.nn.Parameter(torch.zeros(1))]))
    for group in resumed.param_groups:
        states = [resumed.state[p] for p in group["params"]]
        if where_here == STEP_IN_PARAM_GROUP:
            assert group["step"] == 3 and all("step" not in st for st in states)
        else:
            assert "step" not in group and all(st["step"].item() == 3.0 for st in states)
    for i, p in enumerate(copies):
        p.grad = GRADS[3].clone() * (i + 1)
    resumed.step()
    for got, want in zip(copies, reference):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=0, atol=1e-6)


def test_without_the_conversion_each_direction_fails():
    """What the conversion prevents: torch's AdamW refuses an apex-layout state (KeyError 'step', in
    torch 2.13 already in load_state_dict); the apex layout on a torch state restarts the bias correction."""
    import copy
    params, opt = _train(GroupStepAdamW, GRADS[:3])
    _, torch_opt = _train(torch.optim.AdamW, [], [torch.nn.Parameter(p.detach().clone()) for p in params])
    with pytest.raises(KeyError, match="step"):
        torch_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        for p in (q for g in torch_opt.param_groups for q in g["params"]):
            p.grad = torch.ones_like(p)
        torch_opt.step()
    params, opt = _train(torch.optim.AdamW, GRADS[:3])
    _, group_opt = _train(GroupStepAdamW, [], [torch.nn.Parameter(p.detach().clone()) for p in params])
    group_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert all("step" not in g for g in group_opt.param_groups)  # would count from 1 again


def test_recorded_layout_decides_when_both_copies_exist():
    """DeepSpeed's elastic ZeRO load writes a group "step" whatever the optimizer: the recorded writer's
    layout says which copy is the real one."""
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p])
    opt.state[p] = {"step": torch.tensor(5.0), "exp_avg": torch.zeros(2), "exp_avg_sq": torch.zeros(2)}
    opt.param_groups[0]["step"] = 9
    convert_loaded_adam_step(opt, STEP_PER_PARAMETER, STEP_IN_PARAM_GROUP)
    assert opt.state[p]["step"].item() == 9.0 and "step" not in opt.param_groups[0]
    opt.param_groups[0]["step"] = 9
    convert_loaded_adam_step(opt, STEP_PER_PARAMETER, None)  # not recorded: the parameter state first
    assert opt.state[p]["step"].item() == 9.0  # (the state said 9 after the first conversion)
    opt.state[p]["step"] = torch.tensor(4.0)
    opt.param_groups[0]["step"] = 9
    convert_loaded_adam_step(opt, STEP_PER_PARAMETER, None)
    assert opt.state[p]["step"].item() == 4.0


def test_state_dict_conversion_moves_the_step_both_ways():
    params, opt = _train(GroupStepAdamW, GRADS[:2])
    sd = opt.state_dict()
    per_param = convert_state_dict_step(sd, STEP_PER_PARAMETER, STEP_IN_PARAM_GROUP)
    assert all("step" not in g for g in per_param["param_groups"])
    assert [st["step"].item() for st in per_param["state"].values()] == [2.0, 2.0]
    back = convert_state_dict_step(per_param, STEP_IN_PARAM_GROUP, STEP_PER_PARAMETER)
    assert [g["step"] for g in back["param_groups"]] == [2, 2]
    assert all("step" not in st for st in back["state"].values())
    assert [g["step"] for g in sd["param_groups"]] == [2, 2]  # input untouched


def test_metadata_record_and_old_checkpoints():
    p = torch.nn.Parameter(torch.zeros(2))
    assert describe_optimizer(torch.optim.AdamW([p])) == {"class": "torch.optim.adamw.AdamW",
                                                          "adam_step": STEP_PER_PARAMETER}
    assert describe_optimizer(GroupStepAdamW([p]))["adam_step"] == STEP_IN_PARAM_GROUP
    assert saved_step_layout({"optimizer": {"adam_step": "param_group"}}) == STEP_IN_PARAM_GROUP
    assert saved_step_layout({"iteration": 10}) is None  # written before the field: found where it is
