"""Read tensors out of ``torch.save`` files without loading the whole file.

A ``torch.save`` file is a zip archive: ``data.pkl`` (the pickled object, whose tensors refer to
storages by key) and one record ``data/<key>`` of raw bytes per storage. :class:`TorchFile` unpickles
``data.pkl`` with every tensor replaced by a :class:`LazyTensor` (dtype, shape, where its bytes are),
and reads bytes on demand with ``os.pread``. So reading one parameter's fragment of a ZeRO flat
partition costs the fragment's bytes, not the file, and memory stays bounded by what the caller
keeps (``torch.load(mmap=True)`` would leave every touched page of the file mapped and counted in
the process' RSS).

Only contiguous, little-endian CPU tensors are supported (what DeepSpeed and this project write);
anything else is reported with the file name. The pickle is read through the allowlist of
:mod:`.safe_pickle`: a file naming any other global is refused before it runs anything.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any, Dict, Optional

import torch

from megatron_tokenformer.checkpointing.format.safe_pickle import RestrictedUnpickler

__all__ = ["TorchFile", "LazyTensor", "materialize"]


class _LazyStorage:
    __slots__ = ("file", "key", "dtype", "numel")

    def __init__(self, file: "TorchFile", key: str, dtype: torch.dtype, numel: int):
        self.file, self.key, self.dtype, self.numel = file, key, dtype, numel


class LazyTensor:
    """A tensor stored in a :class:`TorchFile`; nothing is read until :meth:`load` / :meth:`read_flat`.

    shape: the tensor's shape; :meth:`read_flat(start, numel)` returns elements
    [start, start + numel) of the flattened tensor as a 1-D tensor of its dtype.
    """

    __slots__ = ("storage", "offset", "shape", "stride", "requires_grad")

    def __init__(self, storage: _LazyStorage, offset: int, shape, stride, requires_grad=False):
        self.storage = storage
        self.offset = int(offset)
        self.shape = torch.Size(shape)
        self.stride = tuple(stride)
        self.requires_grad = bool(requires_grad)

    @property
    def dtype(self) -> torch.dtype:
        return self.storage.dtype

    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n

    @property
    def nbytes(self) -> int:
        return self.numel() * _element_size(self.dtype)

    def _check_contiguous(self) -> None:
        expected, acc = [], 1
        for s in reversed(self.shape):
            expected.append(acc)
            acc *= int(s)
        expected = tuple(reversed(expected))
        dims = [i for i, s in enumerate(self.shape) if s != 1]
        if any(self.stride[i] != expected[i] for i in dims):
            raise ValueError(f"{self.storage.file.path}: tensor with shape {tuple(self.shape)} and stride "
                             f"{self.stride} is not contiguous; cannot read it lazily")

    def read_flat(self, start: int, numel: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Elements [start, start+numel) of the flattened tensor (1-D, this tensor's dtype)."""
        self._check_contiguous()
        if start < 0 or numel < 0 or start + numel > self.numel():
            raise ValueError(f"{self.storage.file.path}: range [{start}, {start + numel}) outside a tensor of "
                             f"{self.numel()} elements")
        if self.offset + self.numel() > self.storage.numel:
            raise ValueError(f"{self.storage.file.path}: tensor extends past its storage (truncated file?)")
        if out is None:
            out = torch.empty(numel, dtype=self.dtype)
        elif out.numel() != numel or out.dtype != self.dtype or not out.is_contiguous():
            raise ValueError("read_flat: `out` must be a contiguous tensor of the right size and dtype")
        if numel:
            esize = _element_size(self.dtype)
            self.storage.file.read_into(self.storage.key, (self.offset + start) * esize, out)
        return out

    def load(self) -> torch.Tensor:
        """The whole tensor (a new CPU tensor)."""
        return self.read_flat(0, self.numel()).view(self.shape)

    def __repr__(self) -> str:
        return f"LazyTensor(shape={tuple(self.shape)}, dtype={self.dtype}, file={self.storage.file.path!r})"


_ELEMENT_SIZES: Dict[torch.dtype, int] = {}


def _element_size(dtype: torch.dtype) -> int:
    if dtype not in _ELEMENT_SIZES:
        _ELEMENT_SIZES[dtype] = torch.empty((), dtype=dtype).element_size()
    return _ELEMENT_SIZES[dtype]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    return LazyTensor(storage, storage_offset, size, stride, requires_grad)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    return data


class _Opaque:
    """Stand-in for a small record class of another library (e.g. DeepSpeed's ``fragment_address``,
    ``DynamicLossScaler``, ``ZeroStageEnum``): keeps the pickled state as attributes (``args`` for
    constructor arguments) without importing that library."""

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__["args"] = args
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slots state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.__dict__})"


_OPAQUE_CLASSES: Dict[tuple, type] = {}


class _LazyUnpickler(RestrictedUnpickler):
    """The allowlist (:mod:`.safe_pickle`) with tensors as :class:`LazyTensor` and DeepSpeed's records as
    attribute holders (unless DeepSpeed is imported)."""

    def __init__(self, data: bytes, file: "TorchFile", opaque_modules=("deepspeed",)):
        super().__init__(data, file.path)
        self._file = file
        self._storages: Dict[str, _LazyStorage] = {}
        self._opaque = tuple(opaque_modules)

    def resolve(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module.split(".")[0] in self._opaque and module not in sys.modules:
            key = (module, name)
            if key not in _OPAQUE_CLASSES:
                _OPAQUE_CLASSES[key] = type(name, (_Opaque,), {"__module__": f"opaque:{module}"})
            return _OPAQUE_CLASSES[key]
        return super().resolve(module, name)

    def persistent_load(self, saved_id):
        typename = saved_id[0].decode("ascii") if isinstance(saved_id[0], bytes) else saved_id[0]
        if typename != "storage":
            raise ValueError(f"{self._file.path}: unknown persistent id {typename!r}")
        storage_type, key, _location, numel = saved_id[1:5]
        if key not in self._storages:
            if storage_type is torch.UntypedStorage:
                dtype = torch.uint8
            else:
                with warnings.catch_warnings():  # legacy typed-storage classes warn on attribute access
                    warnings.simplefilter("ignore")
                    dtype = getattr(storage_type, "dtype", torch.uint8)
            self._storages[key] = _LazyStorage(self._file, key, dtype, int(numel))
        return self._storages[key]


class TorchFile:
    """A ``torch.save`` zip file opened for lazy reading.

    ``obj``: the saved object with every tensor a :class:`LazyTensor`. No file descriptor is held
    between reads. Classes of DeepSpeed's (ZeRO's fragment
    addresses, loss scalers) are read as plain attribute holders unless DeepSpeed is already
    imported, so reading a checkpoint does not pay for importing DeepSpeed.
    """

    def __init__(self, path: str):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"checkpoint file not found: {self.path}")
        try:
            reader = torch._C.PyTorchFileReader(self.path)
        except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError with a C++ message
            raise ValueError(f"{self.path}: not a readable torch.save file ({str(exc).splitlines()[0]})") from None
        if reader.has_record("byteorder"):
            order = bytes(reader.get_record("byteorder")).decode()
            if order != sys.byteorder:
                raise ValueError(f"{self.path}: saved with {order}-endian byte order; this machine is {sys.byteorder}")
        # Where every storage's bytes start; afterwards no file stays open (a view of a checkpoint
        # with thousands of files must not run out of descriptors): reads open, pread, close.
        self._offsets: Dict[str, int] = {name[len("data/"):]: int(reader.get_record_offset(name))
                                         for name in reader.get_all_records() if name.startswith("data/")}
        self.size = os.path.getsize(self.path)
        self.obj = _LazyUnpickler(bytes(reader.get_record("data.pkl")), self).load()
        del reader

    def byte_offset(self, tensor: "LazyTensor", element: int = 0) -> int:
        """Absolute file offset of element ``element`` of the flattened (contiguous) ``tensor``."""
        tensor._check_contiguous()
        return self._record_offset(tensor.storage.key) + (tensor.offset + element) * _element_size(tensor.dtype)

    def _record_offset(self, key: str) -> int:
        if key not in self._offsets:
            raise ValueError(f"{self.path}: storage record data/{key} is missing (corrupt file)")
        return self._offsets[key]

    def read_into(self, key: str, byte_offset: int, out: torch.Tensor) -> None:
        """Fill ``out`` (contiguous CPU tensor) with bytes of storage ``key`` from ``byte_offset``."""
        position = self._record_offset(key) + byte_offset
        view = memoryview(out.view(torch.uint8).numpy()) if out.dtype != torch.uint8 else memoryview(out.numpy())
        if position + len(view) > self.size:
            raise ValueError(f"{self.path}: file is truncated (needs {position + len(view)} bytes, has {self.size})")
        fd = os.open(self.path, os.O_RDONLY)
        try:
            done = 0
            while done < len(view):
                n = os.preadv(fd, [view[done:done + (1 << 30)]], position + done)
                if n <= 0:
                    raise ValueError(f"{self.path}: unexpected end of file")
                done += n
        finally:
            os.close(fd)

    def close(self) -> None:
        """Nothing to release (no descriptor is held); kept for the context-manager protocol."""

    def __enter__(self) -> "TorchFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def materialize(obj: Any) -> Any:
    """Replace every :class:`LazyTensor` in a (nested) dict/list/tuple by a real tensor (small objects)."""
    if isinstance(obj, LazyTensor):
        return obj.load()
    if isinstance(obj, dict):
        out = type(obj)() if type(obj) is not dict else {}
        for k, v in obj.items():
            out[k] = materialize(v)
        return out
    if isinstance(obj, list):
        return [materialize(v) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(materialize(v) for v in obj)
    return obj
