"""Numerical failures end the run: a NaN/Inf loss or gradient norm (fp32/bf16), or too many fp16 overflows.

* ``--check-for-nan-in-loss-and-grad`` (on by default, as in Megatron; ``--no-...`` to turn it off),
  fp32 and bf16: a step that DeepSpeed skipped (it skips a step whose gradient norm is NaN/Inf: its
  ``skipped_steps`` counter, a Python int, costs no host sync), a non-finite gradient norm, or a
  non-finite loss ends the run. Losses are checked where the loop already reads them on the host
  (every ``--log-interval``) and once before every save, so no NaN weights are ever saved.
* fp16: overflow skips are how dynamic loss scaling works; more than ``--max-skipped-iterations``
  consecutive ones (default 100) end the run.

The failure is :class:`NumericalFailure`, raised on every rank at the same iteration (the loss is
averaged over data-parallel ranks and the gradient norm is global), with a one-line message naming
the iteration; the entry point prints it and exits 1 without saving.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from megatron_tokenformer.errors import EXIT_FAILED, TokenformerError

__all__ = ["NumericalFailure", "NumericsOptions", "NumericsCheck"]


class NumericalFailure(TokenformerError, RuntimeError):
    """Training diverged (one-line message naming the iteration)."""

    exit_code = EXIT_FAILED
    every_rank_prints = False  # every rank sees the same values: rank 0 says it


@dataclass(frozen=True)
class NumericsOptions:
    """The flags of the checks: ``--fp16``, ``--check-for-nan-in-loss-and-grad``, ``--max-skipped-iterations``."""

    fp16: bool = False
    check_for_nan_in_loss_and_grad: bool = True
    max_skipped_iterations: int = 100


class NumericsCheck:
    """Per-run state of the checks (see the module docstring)."""

    def __init__(self, options: NumericsOptions, skipped_steps: int):
        self.fp16 = bool(options.fp16)
        self.check_nan = bool(options.check_for_nan_in_loss_and_grad) and not self.fp16
        self.max_skipped = int(options.max_skipped_iterations)
        self._skipped = int(skipped_steps)
        self.consecutive_skips = 0

    def after_step(self, skipped_steps: int, iteration: int) -> None:
        """Call after every iteration with the engine's ``skipped_steps`` (a Python int: no sync)."""
        skipped = int(skipped_steps) > self._skipped
        self._skipped = int(skipped_steps)
        if not skipped:
            self.consecutive_skips = 0
            return
        self.consecutive_skips += 1
        if self.check_nan:
            raise NumericalFailure(
                f"iteration {iteration}: the gradient norm is NaN or Inf (the optimizer step was skipped); "
                "nothing was saved for this or later iterations (--no-check-for-nan-in-loss-and-grad to go on)")
        if self.fp16 and self.consecutive_skips > self.max_skipped:
            raise NumericalFailure(
                f"iteration {iteration}: {self.consecutive_skips} consecutive iterations skipped for fp16 "
                f"overflow (more than --max-skipped-iterations {self.max_skipped}); "
                f"iteration {iteration} was not saved")

    def check_values(self, losses: Optional[torch.Tensor], last_iteration: int,
                     grad_norm: Optional[float] = None) -> None:
        """``losses``: the losses of iterations ``last_iteration - len + 1 .. last_iteration`` (any device).

        ``grad_norm``: the last iteration's global gradient norm when already on the host.
        """
        if not self.check_nan:
            return
        if losses is not None and losses.numel():
            finite = torch.isfinite(losses.detach().float().reshape(-1)).cpu()
            if not bool(finite.all()):
                first = int((~finite).nonzero()[0, 0])
                it = last_iteration - finite.numel() + 1 + first
                raise NumericalFailure(
                    f"iteration {it}: the loss is {float(losses.reshape(-1)[first])}; nothing was saved for "
                    "this or later iterations (--no-check-for-nan-in-loss-and-grad to go on)")
        if grad_norm is not None and not math.isfinite(grad_norm):
            raise NumericalFailure(
                f"iteration {last_iteration}: the gradient norm is {grad_norm}; nothing was saved for this or "
                "later iterations (--no-check-for-nan-in-loss-and-grad to go on)")

    @staticmethod
    def stack(losses: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
        return torch.stack(list(losses)) if losses else None
