"""training/supervision/numerics.py: NaN/Inf losses and gradient norms, and fp16 overflow skips, end the run."""

import pytest
import torch

from megatron_tokenformer.training.supervision.numerics import NumericalFailure, NumericsCheck, NumericsOptions


def _args(**kw):
    base = dict(fp16=False, check_for_nan_in_loss_and_grad=True, max_skipped_iterations=100)
    base.update(kw)
    return NumericsOptions(**base)


def test_fp32_skipped_step_means_non_finite_gradient():
    check = NumericsCheck(_args(), skipped_steps=5)
    check.after_step(5, 1)
    check.after_step(5, 2)
    with pytest.raises(NumericalFailure, match=r"^iteration 3: the gradient norm is NaN or Inf"):
        check.after_step(6, 3)


def test_check_can_be_turned_off():
    check = NumericsCheck(_args(check_for_nan_in_loss_and_grad=False), skipped_steps=0)
    for it in range(1, 200):
        check.after_step(it, it)
    check.check_values(torch.tensor([float("nan")]), 10, float("inf"))


def test_loss_values_name_the_first_bad_iteration():
    check = NumericsCheck(_args(), skipped_steps=0)
    check.check_values(torch.tensor([1.0, 2.0]), 10, 0.5)
    with pytest.raises(NumericalFailure, match=r"^iteration 11: the loss is nan"):
        check.check_values(torch.tensor([1.0, float("nan"), float("inf"), 2.0]), 13, 0.5)
    with pytest.raises(NumericalFailure, match=r"^iteration 12: the loss is inf"):
        check.check_values(torch.tensor([1.0, float("inf")]), 12, None)
    with pytest.raises(NumericalFailure, match=r"^iteration 7: the gradient norm is nan"):
        check.check_values(None, 7, float("nan"))


def test_fp16_consecutive_skips():
    check = NumericsCheck(_args(fp16=True, max_skipped_iterations=3), skipped_steps=0)
    assert not check.check_nan                      # fp16: skips and inf losses are loss scaling at work
    check.check_values(torch.tensor([float("inf")]), 1, float("inf"))
    skipped = 0
    for it in range(1, 4):                         # three skips, then a good step resets the count
        skipped += 1
        check.after_step(skipped, it)
    check.after_step(skipped, 4)
    for it in range(5, 8):
        skipped += 1
        check.after_step(skipped, it)
    with pytest.raises(NumericalFailure, match=r"^iteration 8: 4 consecutive iterations skipped for fp16 overflow "
                                               r"\(more than --max-skipped-iterations 3\)"):
        check.after_step(skipped + 1, 8)
