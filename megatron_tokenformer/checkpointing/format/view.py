"""A layout-independent, lazily-read view of any step folder this project writes.

:class:`CheckpointView` opens a step folder (``deepspeed`` kind: :mod:`.deepspeed_files`;
``canonical`` kind: :mod:`.canonical`) and presents, for every parameter under its CANONICAL name
(the PP = 1 model's name, e.g. ``layers.3.mlp.key_param_tokens``):

- ``fp32``: the full fp32 master tensor (all TP ranks joined, vocabulary padding trimmed),
- each optimizer state (``exp_avg``, ``exp_avg_sq``, ...) in the same shape, and ``step``,

plus the training state (iteration, consumed samples, LR schedule, loss scaler) and the model config.
Nothing is loaded up front: tensors are read on request, fragment by fragment, with ``os.pread``
(:mod:`.tensor_file`), so memory stays at the size of what the caller asks for.
:meth:`CheckpointView.read_tp_slice` gives the slice a rank of ANY target layout needs (vocabulary
re-padded for the target TP), reading only that slice's bytes where the partitioning allows. It
implements :class:`~.source.CheckpointSource`.
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional, Tuple

import torch

from megatron_tokenformer.checkpointing.format.canonical import Copy, Fill, index_canonical_step
from megatron_tokenformer.checkpointing.format.deepspeed_files import index_deepspeed_step
from megatron_tokenformer.checkpointing.format.entries import (
    FP32,
    CheckpointFormatError,
    CheckpointIndex,
    LocalTensor,
    ParamEntry,
)
from megatron_tokenformer.checkpointing.format.files import META_FILE, resolve_step_dir
from megatron_tokenformer.checkpointing.format.metadata import KIND_CANONICAL, KIND_DEEPSPEED, read_meta
from megatron_tokenformer.checkpointing.format.tensor_file import TorchFile
from megatron_tokenformer.tensor_parallel.utils import partition_range

__all__ = ["CheckpointView", "open_checkpoint"]

# how each storage kind is indexed
_INDEXERS = {KIND_DEEPSPEED: index_deepspeed_step, KIND_CANONICAL: index_canonical_step}


class CheckpointView:
    """Canonical, lazily-read view of one step folder (see the module docstring).

    Attributes: ``step_dir``, ``meta`` (:mod:`.metadata`), ``kind``, ``config`` (ModelConfig),
    ``layout``, ``params`` (name -> :class:`~.entries.ParamEntry`), ``state_keys``, ``keys``
    (``['fp32'] + state_keys``), ``reset_optimizer`` (False), ``training_state``, ``iteration``.
    """

    def __init__(self, step_dir: str, verify: bool = True):
        """``verify``: check every file first (structure, allowed pickle globals, checksums:
        :func:`~megatron_tokenformer.checkpointing.file_checks.verify_step`); False only where the caller
        has (training's collective check)."""
        from megatron_tokenformer.config import ModelConfig

        self.step_dir = os.path.abspath(step_dir)
        if verify:
            from megatron_tokenformer.checkpointing import file_checks
            file_checks.verify_step(self.step_dir)
        self.meta = read_meta(self.step_dir)
        self.kind = self.meta.get("kind")
        try:
            self.config = ModelConfig.from_dict(self.meta["model_config"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointFormatError(f"{self.step_dir}/{META_FILE}: invalid model_config ({exc})") from None
        self.layout: Dict[str, Any] = dict(self.meta.get("layout", {}))
        self._files: List[TorchFile] = []
        indexer = _INDEXERS.get(self.kind)
        if indexer is None:
            raise CheckpointFormatError(f"{self.step_dir}: unknown checkpoint kind {self.kind!r}")
        try:
            index: CheckpointIndex = indexer(self.step_dir, self.meta, self._open)
        except BaseException:
            self.close()
            raise
        self.params = index.params
        self.reset_optimizer = False
        self.state_keys = index.state_keys
        self.training_state = index.training_state
        # canonical name -> key -> list of LocalTensor (one per source TP rank, or one when replicated)
        self._locals = index.locals

    # ---- CheckpointSource
    @property
    def iteration(self) -> int:
        return int(self.training_state.get("iteration", self.meta.get("iteration", 0)))

    @property
    def keys(self) -> List[str]:
        """What can be read per parameter: 'fp32' and the optimizer state keys."""
        return [FP32] + list(self.state_keys)

    def source_name(self, name: str) -> Optional[str]:
        """The parameter ``name`` is read from: itself."""
        self._entry(name)
        return name

    def describe(self, name: str) -> str:
        self._entry(name)
        return "copied"

    def report(self) -> Dict[str, Any]:
        """Nothing is changed by a plain view."""
        return {}

    def plan_parts(self, name: str, key: str = FP32) -> Optional[Tuple[List[Copy], List[Fill]]]:
        """Where the bytes of ``read(name, key)`` lie on disk (copies only, no fills), or None when
        they cannot be copied as they are (see :meth:`flat_sources`)."""
        copies = self.flat_sources(name, key, 0, self._entry(name).numel())
        return None if copies is None else (copies, [])

    def read(self, name: str, key: str = FP32) -> torch.Tensor:
        """The full tensor (fp32 for 'fp32' and optimizer states), shape ``params[name].shape``."""
        entry = self._entry(name)
        locals_ = self._local_list(name, key)
        if entry.partition_dim not in (None, 0):
            return self._read_joined(entry, locals_)
        out = torch.empty(entry.shape, dtype=torch.float32)
        self._read_flat(locals_, 0, entry.numel(), out.view(-1))
        return out

    def read_rows(self, name: str, key: str, start: int, stop: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rows [start, stop) along dim 0 of the full (trimmed) tensor."""
        entry = self._entry(name)
        if not 0 <= start <= stop <= entry.shape[0]:
            raise ValueError(f"{name}: rows [{start}, {stop}) outside {entry.shape[0]} rows")
        locals_ = self._local_list(name, key)
        row = int(math.prod(entry.shape[1:]))
        shape = (stop - start,) + tuple(entry.shape[1:])
        if out is None:
            out = torch.empty(shape, dtype=torch.float32)
        if entry.partition_dim not in (None, 0):
            out.copy_(self._read_joined(entry, locals_)[start:stop])
            return out
        self._read_flat(locals_, start * row, stop * row, out.view(-1))
        return out

    def read_tp_slice(self, name: str, key: str, tp_rank: int, tp_size: int,
                      padded_vocab_size: Optional[int] = None) -> torch.Tensor:
        """The tensor TP rank ``tp_rank`` of ``tp_size`` holds (fp32).

        Vocabulary parameters are padded with zero rows to ``padded_vocab_size`` first (the target
        layout's padded size); replicated parameters are returned whole.
        """
        entry = self._entry(name)
        if entry.partition_dim is None:
            return self.read(name, key)
        if entry.partition_dim != 0:
            full = self.read(name, key)
            if full.shape[entry.partition_dim] % tp_size:
                raise ValueError(f"{name}: dim {entry.partition_dim} of {tuple(full.shape)} is not divisible by "
                                 f"the tensor-model-parallel size {tp_size}")
            return full.chunk(tp_size, dim=entry.partition_dim)[tp_rank].contiguous()
        total = entry.shape[0]
        if entry.vocab:
            if padded_vocab_size is None or padded_vocab_size < total:
                raise ValueError(f"{name}: needs the target padded vocabulary size (>= {total})")
            total = padded_vocab_size
        start, stop = partition_range(total, tp_rank, tp_size, f"{name}: rows")
        out = torch.zeros((stop - start,) + tuple(entry.shape[1:]), dtype=torch.float32)
        valid_stop = min(stop, entry.shape[0])
        if valid_stop > start:
            self.read_rows(name, key, start, valid_stop, out=out[:valid_stop - start])
        return out

    def flat_sources(self, name: str, key: str, lo: int, hi: int) -> Optional[List[Tuple[int, int, int, int]]]:
        """Where elements [lo, hi) of the flattened full tensor lie on disk, for a byte-for-byte copy.

        Returns ``[(file path, file offset, nbytes, output byte offset), ...]`` (output offsets
        relative to element ``lo``), or None when the bytes cannot be copied as they are (a dtype
        conversion, or a partition dimension other than 0).
        """
        entry = self._entry(name)
        if entry.partition_dim not in (None, 0):
            return None
        out: List[Tuple[int, int, int, int]] = []
        base = 0
        for local in self._local_list(name, key):
            n = local.numel()
            a, b = max(lo, base), min(hi, base + n)
            if a < b:
                for f in local.fragments:
                    fa, fb = max(a - base, f.start), min(b - base, f.start + f.numel)
                    if fa >= fb:
                        continue
                    if f.source.dtype != torch.float32:
                        return None
                    tfile = f.source.storage.file
                    offset = tfile.byte_offset(f.source, f.source_start + (fa - f.start))
                    out.append((tfile.path, offset, (fb - fa) * 4, (base + fa - lo) * 4))
            base += n
            if base >= hi:
                break
        return out
    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files = []

    def __enter__(self) -> "CheckpointView":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- internals
    def _entry(self, name: str) -> ParamEntry:
        try:
            return self.params[name]
        except KeyError:
            raise KeyError(f"{self.step_dir}: no parameter named {name!r}") from None

    def _local_list(self, name: str, key: str) -> List[LocalTensor]:
        per_key = self._locals.get(name, {})
        if key not in per_key:
            have = ", ".join(sorted(per_key)) or "nothing"
            raise KeyError(f"{self.step_dir}: parameter {name!r} has no {key!r} (has {have})")
        return per_key[key]

    @staticmethod
    def _read_flat(locals_: List[LocalTensor], lo: int, hi: int, out: torch.Tensor) -> None:
        base = 0
        for local in locals_:
            n = local.numel()
            a, b = max(lo, base), min(hi, base + n)
            if a < b:
                local.read_range(a - base, b - base, out[a - lo:b - lo])
            base += n
            if base >= hi:
                break

    @staticmethod
    def _read_joined(entry: ParamEntry, locals_: List[LocalTensor]) -> torch.Tensor:
        pieces = []
        for local in locals_:
            t = torch.empty(local.shape, dtype=torch.float32)
            local.read_range(0, local.numel(), t.view(-1))
            pieces.append(t)
        full = torch.cat(pieces, dim=entry.partition_dim)
        if entry.vocab:
            full = full[:entry.shape[0]].contiguous()
        return full


    def _open(self, path: str) -> TorchFile:
        f = TorchFile(path)
        self._files.append(f)
        return f


def open_checkpoint(load_dir: str, iteration: Optional[int] = None) -> CheckpointView:
    """The view of ``load_dir``'s step ``iteration`` (default: the one ``latest`` names)."""
    step_dir = resolve_step_dir(load_dir, iteration)
    if step_dir is None:
        raise FileNotFoundError(f"{load_dir}: no `latest` file, nothing to read (pass --iteration N)")
    return CheckpointView(step_dir)
