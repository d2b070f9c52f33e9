"""What a checkpoint index is made of: parameter entries and where their bytes lie.

A reader of a step folder (:mod:`.deepspeed_files`, :mod:`.canonical`) returns a
:class:`CheckpointIndex`: for every parameter under its canonical name a :class:`ParamEntry` (full
shape, dtype, TP partitioning) and, for every key (``fp32`` master, optimizer states), the
:class:`LocalTensor` of each source TP rank as consecutive :class:`Fragment` s of lazily-read
tensors (:mod:`.tensor_file`). Nothing is read until :meth:`LocalTensor.read_range`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import torch

from megatron_tokenformer.errors import TokenformerError

if TYPE_CHECKING:  # (tensor_file imports this module's errors)
    from megatron_tokenformer.checkpointing.format.tensor_file import LazyTensor

__all__ = ["FP32", "CheckpointFormatError", "CheckpointMismatchError", "ParamEntry", "Fragment", "LocalTensor",
           "CheckpointIndex"]

FP32 = "fp32"


class CheckpointFormatError(TokenformerError, ValueError):
    """A checkpoint folder is incomplete or inconsistent (missing shard, shapes that do not add up)."""


class CheckpointMismatchError(TokenformerError, ValueError):
    """The checkpoint does not fit the model described by the flags (fields listed in the message)."""


@dataclass
class ParamEntry:
    """One parameter of the canonical view.

    shape: the FULL shape (all TP ranks; vocabulary padding trimmed to ``config.vocab_size`` rows).
    dtype: the model (low-precision) dtype name; the fp32 master is always float32.
    partition_dim: the TP partition dimension, or None for a parameter replicated on the TP group.
    vocab: rows >= vocab_size are padding (re-added with zeros for the target TP).
    step: the optimizer step count of its group (None when there is no optimizer state).
    """

    name: str
    shape: Tuple[int, ...]
    dtype: str = "float32"
    partition_dim: Optional[int] = None
    vocab: bool = False
    step: Optional[float] = None

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype,
                "partition_dim": self.partition_dim, "vocab": self.vocab, "step": self.step}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ParamEntry":
        return cls(d["name"], tuple(int(s) for s in d["shape"]), d.get("dtype", "float32"), d.get("partition_dim"),
                   bool(d.get("vocab", False)), d.get("step"))

    def numel(self) -> int:
        return int(math.prod(self.shape))


@dataclass
class Fragment:
    """``numel`` elements of a local tensor from ``start`` on, found in ``source`` from ``source_start`` on."""

    start: int            # offset in the flattened local tensor
    numel: int
    source: LazyTensor
    source_start: int     # offset in the flattened source tensor


@dataclass
class LocalTensor:
    """One TP rank's tensor of a parameter, as consecutive fragments of its flattened form."""

    shape: Tuple[int, ...]
    fragments: List[Fragment] = field(default_factory=list)

    def numel(self) -> int:
        return int(math.prod(self.shape))

    def check(self, what: str) -> None:
        pos = 0
        for f in self.fragments:
            if f.start != pos:
                raise CheckpointFormatError(f"{what}: fragments do not tile the tensor (gap or overlap at "
                                            f"element {pos}, next fragment starts at {f.start}); a ZeRO shard "
                                            "is missing or belongs to another checkpoint")
            pos += f.numel
        if pos != self.numel():
            raise CheckpointFormatError(f"{what}: fragments cover {pos} elements but the shape "
                                        f"{tuple(self.shape)} has {self.numel()}; a ZeRO shard is missing or "
                                        "the shapes are inconsistent")

    def read_range(self, lo: int, hi: int, out: torch.Tensor) -> None:
        """Elements [lo, hi) of the flattened local tensor into the 1-D ``out`` (len hi - lo)."""
        for f in self.fragments:
            a, b = max(lo, f.start), min(hi, f.start + f.numel)
            if a >= b:
                continue
            piece = out[a - lo:b - lo]
            if f.source.dtype == piece.dtype:
                f.source.read_flat(f.source_start + (a - f.start), b - a, out=piece)
            else:
                piece.copy_(f.source.read_flat(f.source_start + (a - f.start), b - a))


@dataclass
class CheckpointIndex:
    """What a step folder holds: ``params`` (canonical name -> entry, in model order), the optimizer
    ``state_keys``, the ``training_state`` (iteration, samples, LR schedule, loss scaler) and
    ``locals[name][key]``: the local tensor of each source TP rank (one when replicated), in rank order."""

    params: "OrderedDict[str, ParamEntry]" = field(default_factory=OrderedDict)
    state_keys: List[str] = field(default_factory=list)
    training_state: Dict[str, Any] = field(default_factory=dict)
    locals: Dict[str, Dict[str, List[LocalTensor]]] = field(default_factory=dict)

