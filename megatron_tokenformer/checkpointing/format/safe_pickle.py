"""Which globals a checkpoint file may name: the allowlist every checkpoint read goes through.

A ``torch.save`` file holds a pickle (``data.pkl``). Unpickling calls whatever the pickle names
(``os.system``, ``builtins.eval``, ...): ``torch.load(weights_only=False)``, which DeepSpeed's loader
uses, runs a crafted file's code. The files this project and DeepSpeed write name only the globals
of :data:`ALLOWED_GLOBALS`: tensors and their storages, ``torch.Size``, an ``OrderedDict``, numpy
arrays and dtypes (the RNG states) and three small DeepSpeed records. The list was read off real
checkpoints (``pickletools``), saved at TP 1/2, PP 1/2, DP 1/2, ZeRO 1/2, fp32/bf16/fp16, both model
families, canonical folders and the RNG files (tests/unit/checkpointing/format/test_safe_pickle.py
checks such files against it). :class:`RestrictedUnpickler` refuses any other global with
:class:`UnsafeCheckpointError`, one line naming the file and the global, before anything of it is
imported or called (docs/checkpoints.md, "Trust model").
"""

from __future__ import annotations

import importlib
import io
import pickle
from typing import FrozenSet, Tuple

from megatron_tokenformer.checkpointing.format.entries import CheckpointFormatError

__all__ = ["ALLOWED_GLOBALS", "DEEPSPEED_GLOBALS", "UnsafeCheckpointError", "RestrictedUnpickler",
           "refusal_message"]

# torch's storage classes (a storage names its element type; data, not code)
_STORAGES = ("FloatStorage", "DoubleStorage", "HalfStorage", "BFloat16Storage", "LongStorage", "IntStorage",
             "ShortStorage", "CharStorage", "ByteStorage", "BoolStorage", "UntypedStorage")

# DeepSpeed's records in its model and ZeRO files (read as attribute holders, never constructed by
# DeepSpeed code, when DeepSpeed is not imported: tensor_file._Opaque)
DEEPSPEED_GLOBALS: FrozenSet[Tuple[str, str]] = frozenset({
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),          # ZeRO shards: the stage
    ("deepspeed.utils.tensor_fragment", "fragment_address"),     # ZeRO shards: param_slice_mappings
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),        # ZeRO shards: fp32/bf16 static scaler
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),  # ZeRO shards: fp16 dynamic scaler
})

ALLOWED_GLOBALS: FrozenSet[Tuple[str, str]] = frozenset({
    ("torch._utils", "_rebuild_tensor_v2"),   # every tensor
    ("torch._utils", "_rebuild_parameter"),   # a tensor saved as an nn.Parameter
    ("torch", "Size"),                        # DeepSpeed's param_shapes
    ("torch", "float16"),                     # fp16 ZeRO shards (a dtype)
    ("torch", "bfloat16"),                    # (the same for the other precisions)
    ("torch", "float32"),
    ("collections", "OrderedDict"),           # state dicts
    ("numpy", "ndarray"),                     # numpy RNG state (tokenformer_rng_rank_*.pt)
    ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"),   # numpy >= 2
    ("numpy.core.multiarray", "_reconstruct"),    # the same, in files written with numpy 1.x
    ("_codecs", "encode"),                    # bytes in a protocol-2 pickle (the numpy state's)
} | {("torch", s) for s in _STORAGES}) | DEEPSPEED_GLOBALS


class UnsafeCheckpointError(CheckpointFormatError):
    """A checkpoint file names a global outside :data:`ALLOWED_GLOBALS` (one line: file and global)."""


def refusal_message(path: str, module: str, name: str) -> str:
    return (f"{path}: refused: its pickle names {module}.{name}, which no checkpoint of this project or "
            "DeepSpeed holds; loading it could run code (nothing was loaded; see docs/checkpoints.md, "
            "'Trust model')")


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`ALLOWED_GLOBALS` (anything else: :class:`UnsafeCheckpointError`).

    ``path`` names the file in the error. Subclasses map allowed globals to stand-ins with
    :meth:`resolve` (the lazy tensor reader does) and give storages with ``persistent_load``.
    """

    def __init__(self, data: bytes, path: str):
        super().__init__(io.BytesIO(data))
        self.path = path

    def find_class(self, module, name):
        if (module, name) not in ALLOWED_GLOBALS:
            raise UnsafeCheckpointError(refusal_message(self.path, module, name))
        return self.resolve(module, name)

    def resolve(self, module: str, name: str):
        """The object an allowed global stands for (default: the real one, by exactly that name: no
        Python 2 name mapping)."""
        return getattr(importlib.import_module(module), name)
