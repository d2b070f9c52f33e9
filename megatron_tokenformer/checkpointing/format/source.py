"""The read interface every checkpoint source offers: a step folder (:class:`~.view.CheckpointView`),
a grown model (:class:`~megatron_tokenformer.checkpointing.grow.GrownView`) and a widened one
(:class:`~megatron_tokenformer.checkpointing.net2net.WidenedView`).

Writers (:class:`~.canonical.CanonicalWriter` via checkpointing/expand.py) and loaders
(checkpointing/reshard.py) take any :class:`CheckpointSource`.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Protocol, Tuple, runtime_checkable

import torch

from megatron_tokenformer.checkpointing.format.canonical import Copy, Fill
from megatron_tokenformer.checkpointing.format.entries import ParamEntry

__all__ = ["CheckpointSource", "Parts"]

# (byte copies from source files, values written in place): a tensor written without building it
Parts = Tuple[List[Copy], List[Fill]]


@runtime_checkable
class CheckpointSource(Protocol):
    """Full-shape fp32 tensors by canonical parameter name and key.

    ``config``: the model config the tensors belong to; ``params``: name -> entry (full shape, TP
    partition dim, vocab flag, optimizer step), in model order; ``state_keys``: optimizer states
    (``exp_avg``, ...); ``keys``: ``['fp32'] + state_keys``; ``reset_optimizer``: the source's
    optimizer state (moments, loss scale) is dropped.
    """

    config: Any
    params: Dict[str, ParamEntry]
    state_keys: List[str]
    reset_optimizer: bool

    @property
    def keys(self) -> List[str]: ...

    def read(self, name: str, key: str = "fp32") -> torch.Tensor:
        """The full float32 tensor ``key`` of parameter ``name``, shape ``params[name].shape``."""

    def source_name(self, name: str) -> Optional[str]:
        """The parameter of the underlying step folder that ``name`` comes from (None: newly made)."""

    def describe(self, name: str) -> str:
        """One phrase saying how ``name`` was obtained (for dry runs and reports)."""

    def report(self) -> Dict[str, Any]:
        """What this source changed (growth, widening); ``{}`` for none."""

    def plan_parts(self, name: str, key: str = "fp32") -> Optional[Parts]:
        """How to write ``read(name, key)`` without materialising it (byte copies + in-place fills,
        regions covered by neither stay zero), or None when it must be read and written whole."""
