"""What saving and loading a training checkpoint read from the run's flags: :class:`CheckpointOptions`.

The entry point builds it once (:func:`megatron_tokenformer.arguments.checkpoint_options`); nothing under
``checkpointing/`` receives or writes the argument namespace.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

__all__ = ["CheckpointOptions"]


@dataclass(frozen=True)
class CheckpointOptions:
    """The checkpoint flags of a training run.

    ``save`` / ``load``: ``--save`` / ``--load`` folders (None: not given). ``finetune``: load the model only
    and start a new run (iteration 0, no optimizer, scheduler or RNG states, a new run id). ``no_load_optim``
    / ``no_load_rng``: ``--no-load-optim`` / ``--no-load-rng``. ``keep_last_n_checkpoints``: prune this run's
    older steps after each save (None: keep all). ``overwrite_checkpoints``: a run not resuming from
    ``--save`` may write into a folder that holds steps. ``run_args``: the run's flags as recorded in every
    step's metadata (``"args"``; what a resume reconciles with, :mod:`megatron_tokenformer.checkpoint_args`).
    """

    save: Optional[str] = None
    load: Optional[str] = None
    finetune: bool = False
    no_load_optim: bool = False
    no_load_rng: bool = False
    keep_last_n_checkpoints: Optional[int] = None
    overwrite_checkpoints: bool = False
    run_args: Mapping[str, Any] = field(default_factory=dict)
