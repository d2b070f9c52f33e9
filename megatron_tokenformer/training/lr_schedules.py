"""Learning-rate schedule: linear warmup, then constant / linear / cosine decay to ``min_lr``.

The schedule is a function of the number of optimizer updates already taken, ``k = num_steps``
(0 for the first update); the update ``k`` uses :func:`learning_rate`:

* warmup (``k < warmup_steps``): ``max_lr * (k + 1) / warmup_steps`` (so the first update is not wasted
  on a zero learning rate and update ``warmup_steps - 1`` reaches ``max_lr``);
* decay (``warmup_steps <= k < decay_steps``), with ``r = (k - warmup_steps) / (decay_steps - warmup_steps)``:
    constant ``max_lr``; linear ``min_lr + (max_lr - min_lr) * (1 - r)``;
    cosine ``min_lr + (max_lr - min_lr) * (1 + cos(pi * r)) / 2``
* from ``decay_steps`` on: ``min_lr`` (``max_lr`` for constant).

The decay part is Megatron's; Megatron's warmup starts from 0 at ``k = 0``. DeepSpeed calls :meth:`step` after
every applied optimizer step (not after an fp16 step skipped for overflow) and saves :meth:`state_dict` in its
checkpoints.

On resume (:meth:`OptimizerParamScheduler.load_state_dict`) the step count is restored and the
schedule's shape is reconciled as Megatron does (:func:`reconcile_schedule`): a checkpoint whose
max/min LR, warmup, decay iterations or decay style differ from the flags is refused with the
differing fields listed, unless ``--override-opt-param-scheduler`` (keep the flags) or
``--use-checkpoint-opt-param-scheduler`` (take the checkpoint's) is given. The scheduler is the only
source of the learning rate: :meth:`OptimizerParamScheduler.apply` writes it into the optimizer's
parameter groups, also after a checkpoint's optimizer state (with its own stored ``lr``) was loaded.
"""

from __future__ import annotations

import math

from megatron_tokenformer.errors import TokenformerError

__all__ = ["OptimizerParamScheduler", "learning_rate", "reconcile_schedule", "ScheduleMismatchError",
           "SCHEDULE_FLAGS"]

# schedule field -> the flag that sets it
SCHEDULE_FLAGS = {"max_lr": "--lr", "min_lr": "--min-lr", "warmup_steps": "--lr-warmup-iters",
                  "decay_steps": "--lr-decay-iters", "decay_style": "--lr-decay-style"}


class ScheduleMismatchError(TokenformerError, ValueError):
    """The checkpoint's learning-rate schedule differs from the flags (fields listed in the message)."""


def _same(a, b) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)


def reconcile_schedule(flags: dict, checkpoint: dict, override: bool = False, use_checkpoint: bool = False) -> dict:
    """The schedule (``SCHEDULE_FLAGS`` fields) to resume with, Megatron's rule.

    ``flags``: the schedule the command line describes; ``checkpoint``: the saved one (fields it
    lacks are taken from ``flags``). ``override``: the flags win; ``use_checkpoint``: the
    checkpoint wins; neither: they must agree, else :class:`ScheduleMismatchError` naming every
    differing flag. Both: ValueError.
    """
    if override and use_checkpoint:
        raise ValueError("--override-opt-param-scheduler and --use-checkpoint-opt-param-scheduler exclude each other")
    out = {}
    diffs = []
    for field, flag in SCHEDULE_FLAGS.items():
        mine = flags[field]
        theirs = checkpoint.get(field, mine)
        out[field] = theirs if use_checkpoint else mine
        if not _same(mine, theirs):
            hint = "; it defaults to --train-iters" if field == "decay_steps" else ""
            diffs.append(f"{flag} {mine} (checkpoint: {theirs}{hint})")
    if diffs and not (override or use_checkpoint):
        raise ScheduleMismatchError(
            "the checkpoint's learning-rate schedule differs from the flags: " + "; ".join(diffs)
            + ". Pass --override-opt-param-scheduler to use the flags' schedule or "
              "--use-checkpoint-opt-param-scheduler to use the checkpoint's")
    return out


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
                 decay_style: str, override_opt_param_scheduler: bool = False,
                 use_checkpoint_opt_param_scheduler: bool = False):
        self.optimizer = optimizer
        self.override_opt_param_scheduler = bool(override_opt_param_scheduler)
        self.use_checkpoint_opt_param_scheduler = bool(use_checkpoint_opt_param_scheduler)
        if self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler:
            raise ValueError("--override-opt-param-scheduler and --use-checkpoint-opt-param-scheduler exclude "
                             "each other")
        self._set_schedule(max_lr, min_lr, warmup_steps, decay_steps, decay_style)
        self.num_steps = 0
        self.apply()

    def _set_schedule(self, max_lr, min_lr, warmup_steps, decay_steps, decay_style) -> None:
        if not 0 <= min_lr <= max_lr:
            raise ValueError(f"need 0 <= min_lr ({min_lr}) <= max_lr ({max_lr})")
        if warmup_steps > decay_steps:
            raise ValueError(f"warmup steps ({warmup_steps}) exceed decay steps ({decay_steps})")
        learning_rate(0, float(max_lr), float(min_lr), int(warmup_steps), int(decay_steps), decay_style)
        self.max_lr, self.min_lr = float(max_lr), float(min_lr)
        self.warmup_steps, self.decay_steps = int(warmup_steps), int(decay_steps)
        self.decay_style = decay_style

    def get_lr(self) -> float:
        """Learning rate the next update uses."""
        return learning_rate(self.num_steps, self.max_lr, self.min_lr, self.warmup_steps,
                             self.decay_steps, self.decay_style)

    def apply(self) -> None:
        """Write the learning rate of the next update into every parameter group (x its ``lr_mult``)."""
        lr = self.get_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)

    def step(self, increment: int = 1, **_unused) -> None:
        self.num_steps += increment
        self.apply()

    def state_dict(self) -> dict:
        return {"num_steps": self.num_steps, "max_lr": self.max_lr, "min_lr": self.min_lr,
                "warmup_steps": self.warmup_steps, "decay_steps": self.decay_steps,
                "decay_style": self.decay_style}

    def load_state_dict(self, state: dict) -> None:
        """Restore the step count; reconcile the schedule's shape with the flags (:func:`reconcile_schedule`).

        Raises :class:`ScheduleMismatchError` (one line, the differing flags) when they differ and
        neither ``--override-opt-param-scheduler`` nor ``--use-checkpoint-opt-param-scheduler`` was given.
        """
        flags = {"max_lr": self.max_lr, "min_lr": self.min_lr, "warmup_steps": self.warmup_steps,
                 "decay_steps": self.decay_steps, "decay_style": self.decay_style}
        schedule = reconcile_schedule(flags, state, self.override_opt_param_scheduler,
                                      self.use_checkpoint_opt_param_scheduler)
        self._set_schedule(**schedule)
        self.num_steps = int(state["num_steps"])
        self.apply()
