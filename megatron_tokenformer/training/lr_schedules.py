"""Learning-rate schedule: linear warmup, then constant / linear / cosine decay to ``min_lr``.

The schedule is a function of the number of optimizer updates already taken, ``k = num_steps``
(0 for the first update); the update ``k`` uses :func:`learning_rate`:

* warmup (``k < warmup_steps``): ``max_lr * (k + 1) / warmup_steps`` (so the first update is not wasted
  on a zero learning rate and update ``warmup_steps - 1`` reaches ``max_lr``);
* decay (``warmup_steps <= k < decay_steps``), with ``r = (k - warmup_steps) / (decay_steps - warmup_steps)``:
    constant ``max_lr``; linear ``min_lr + (max_lr - min_lr) * (1 - r)``;
    cosine ``min_lr + (max_lr - min_lr) * (1 + cos(pi * r)) / 2``
* from ``decay_steps`` on: ``min_lr`` (``max_lr`` for constant).

The decay part is Megatron's; Megatron's warmup starts from 0 at ``k = 0``. DeepSpeed calls :meth:`step` after every applied optimizer step (not after an
fp16 step skipped for overflow) and saves :meth:`state_dict` in its checkpoints.
"""

from __future__ import annotations

import math

__all__ = ["OptimizerParamScheduler", "learning_rate"]


def learning_rate(num_steps: int, max_lr: float, min_lr: float, warmup_steps: int, decay_steps: int,
                  decay_style: str) -> float:
    """Learning rate of the update taken after ``num_steps`` earlier updates (0-based)."""
    if decay_style not in ("constant", "linear", "cosine"):
        raise ValueError(f"unknown lr decay style {decay_style!r}")
    k = num_steps
    if warmup_steps > 0 and k < warmup_steps:
        return max_lr * (k + 1) / warmup_steps
    if decay_style == "constant":
        return max_lr
    if k >= decay_steps:
        return min_lr
    ratio = (k - warmup_steps) / (decay_steps - warmup_steps)
    if decay_style == "linear":
        coeff = 1.0 - ratio
    else:
        coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
    return min_lr + (max_lr - min_lr) * coeff


class OptimizerParamScheduler:
    """Sets ``lr`` on every parameter group of ``optimizer`` (scaled by a group's ``lr_mult``)."""

    def __init__(self, optimizer, max_lr: float, min_lr: float, warmup_steps: int, decay_steps: int,
                 decay_style: str):
        if not 0 <= min_lr <= max_lr:
            raise ValueError(f"need 0 <= min_lr ({min_lr}) <= max_lr ({max_lr})")
        if warmup_steps > decay_steps:
            raise ValueError(f"warmup steps ({warmup_steps}) exceed decay steps ({decay_steps})")
        self.optimizer = optimizer
        self.max_lr, self.min_lr = float(max_lr), float(min_lr)
        self.warmup_steps, self.decay_steps = int(warmup_steps), int(decay_steps)
        self.decay_style = decay_style
        self.num_steps = 0
        learning_rate(0, self.max_lr, self.min_lr, self.warmup_steps, self.decay_steps, decay_style)
        self._apply()

    def get_lr(self) -> float:
        """Learning rate the next update uses."""
        return learning_rate(self.num_steps, self.max_lr, self.min_lr, self.warmup_steps,
                             self.decay_steps, self.decay_style)

    def _apply(self) -> None:
        lr = self.get_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)

    def step(self, increment: int = 1, **_unused) -> None:
        self.num_steps += increment
        self._apply()

    def state_dict(self) -> dict:
        return {"num_steps": self.num_steps, "max_lr": self.max_lr, "min_lr": self.min_lr,
                "warmup_steps": self.warmup_steps, "decay_steps": self.decay_steps,
                "decay_style": self.decay_style}

    def load_state_dict(self, state: dict) -> None:
        """Restore the step count; the schedule's shape stays the one given on the command line."""
        self.num_steps = int(state["num_steps"])
        self._apply()
