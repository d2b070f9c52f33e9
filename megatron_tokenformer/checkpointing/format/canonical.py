"""The ``canonical`` storage kind: one full tensor per (parameter, key), loadable at any layout.

A canonical step folder (written by tools/expand_checkpoint.py) holds ``canonical/<name>/<key>.pt``
(``torch.save`` of one contiguous float32 tensor of the parameter's FULL shape, vocabulary padding
trimmed; ``key`` is ``fp32`` or an optimizer state such as ``exp_avg``) and the metadata
(:mod:`.metadata`) with the parameter list, the optimizer state keys and the training state.

:func:`index_canonical_step` reads it; :class:`CanonicalWriter` writes it.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Tuple

import torch

from megatron_tokenformer.checkpointing.format.checksums import (
    MANIFEST_PREFIX,
    ChecksumRecorder,
    HashingWriter,
    metadata_entry,
)
from megatron_tokenformer.checkpointing.format.entries import (
    FP32,
    CheckpointFormatError,
    CheckpointIndex,
    Fragment,
    LocalTensor,
    ParamEntry,
)
from megatron_tokenformer.checkpointing.format.files import CANONICAL_DIR, META_FILE
from megatron_tokenformer.checkpointing.format.metadata import write_json
from megatron_tokenformer.checkpointing.format.tensor_file import LazyTensor, TorchFile
from megatron_tokenformer.fileio import durable_write

__all__ = ["tensor_file", "index_canonical_step", "CanonicalWriter", "Copy", "Fill"]

# (source file path, source byte offset, nbytes, output byte offset): bytes copied as they are
Copy = Tuple[str, int, int, int]
# (output element offset, float32 tensor): values written in place
Fill = Tuple[int, torch.Tensor]


def tensor_file(step_dir: str, name: str, key: str) -> str:
    """The file of parameter ``name``'s tensor ``key`` in a canonical step folder."""
    return os.path.join(step_dir, CANONICAL_DIR, name, f"{key}.pt")


def index_canonical_step(step_dir: str, meta: Dict[str, Any], open_file: Callable[[str], TorchFile]) -> CheckpointIndex:
    """Index a canonical step folder from its metadata and tensor files, without reading tensor data.

    ``open_file(path)`` opens a :class:`~.tensor_file.TorchFile` (the caller closes them). Raises
    :class:`CheckpointFormatError` naming the file when one is missing or has the wrong shape.
    """
    index = CheckpointIndex(OrderedDict((d["name"], ParamEntry.from_dict(d)) for d in meta.get("params", [])),
                            list(meta.get("optimizer_state_keys", [])), dict(meta.get("training_state", {})))
    if not index.params:
        raise CheckpointFormatError(f"{step_dir}/{META_FILE}: no parameter list")
    for name, entry in index.params.items():
        per_key = {}
        for key in [FP32] + index.state_keys:
            path = tensor_file(step_dir, name, key)
            if not os.path.isfile(path):
                raise CheckpointFormatError(f"missing checkpoint file {path}")
            f = open_file(path)
            t = f.obj
            if not isinstance(t, LazyTensor) or tuple(t.shape) != tuple(entry.shape):
                raise CheckpointFormatError(f"{f.path}: expected a tensor of shape {tuple(entry.shape)}, got "
                                            f"{getattr(t, 'shape', type(t).__name__)}")
            per_key[key] = [LocalTensor(tuple(entry.shape), [Fragment(0, entry.numel(), t, 0)])]
        index.locals[name] = per_key
    return index


class CanonicalWriter:
    """Writes a ``canonical`` step folder: one file per (parameter, key), then the metadata.

    Used as: ``w = CanonicalWriter(partial_dir)``; ``w.write(name, key, tensor)`` for every parameter
    and key; ``w.finish(meta)`` writes the metadata. Each tensor file is fsynced when written
    (``fsync=False``: left to the operating system).
    """

    def __init__(self, step_dir: str, fsync: bool = True):
        self.step_dir = step_dir
        self.fsync = fsync
        os.makedirs(os.path.join(step_dir, CANONICAL_DIR), exist_ok=True)
        self.bytes_written = 0
        self.checksums = ChecksumRecorder(step_dir)

    def write(self, name: str, key: str, tensor: torch.Tensor) -> None:
        path = tensor_file(self.step_dir, name, key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tensor = tensor.detach().contiguous()
        with durable_write(path, fsync=self.fsync) as f, _no_zip_crc():
            writer = HashingWriter(f)  # the checksum of what is written, as it is written
            torch.save(tensor, writer)
        self.checksums.record_writer(path, writer)
        self.bytes_written += tensor.numel() * tensor.element_size()

    def write_parts(self, name: str, key: str, shape: Tuple[int, ...], copies: List[Copy],
                    fills: List[Fill]) -> None:
        """Write a float32 tensor of ``shape`` without materialising it: the file is laid out by
        ``torch.save`` with its data left as a hole (zeros), then ``copies`` (``(path, offset, nbytes,
        output byte offset)``, from :meth:`~.view.CheckpointView.flat_sources`) are copied file-to-file
        with ``copy_file_range`` and ``fills`` (``(output element offset, tensor)``) written in place.
        Regions covered by neither stay zero."""
        path = tensor_file(self.step_dir, name, key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        placeholder = torch.empty(shape, dtype=torch.float32)  # never touched: no memory is used
        with open(path, "wb") as f, _no_zip_crc(), torch.serialization.skip_data():
            torch.save(placeholder, f)
        data_offset = int(torch._C.PyTorchFileReader(path).get_record_offset("data/0"))
        fd = os.open(path, os.O_WRONLY)
        sources: Dict[str, int] = {}
        try:
            for src_path, src_off, nbytes, out_off in copies:
                if src_path not in sources:
                    sources[src_path] = os.open(src_path, os.O_RDONLY)
                _copy_range(sources[src_path], src_off, fd, data_offset + out_off, nbytes)
            for elem, tensor in fills:
                view = memoryview(tensor.detach().to(torch.float32).contiguous().view(torch.uint8).numpy())
                pos, done = data_offset + elem * 4, 0
                while done < len(view):
                    done += os.pwrite(fd, view[done:done + (1 << 30)], pos + done)
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
            for src in sources.values():
                os.close(src)
        # the bytes were copied in the kernel, never through this process: one read of the (page-cached)
        # file gives its checksum
        self.checksums.record_file(path)
        self.bytes_written += int(math.prod(shape)) * 4

    def finish(self, meta: Dict[str, Any]) -> None:
        """Write the metadata and the checksum manifest (every file of the folder: those written
        here, and the small ones the caller added -- tokenizer, report -- read once)."""
        meta = dict(meta, checksums=metadata_entry(1))
        write_json(os.path.join(self.step_dir, META_FILE), meta)
        for root, _, names in os.walk(self.step_dir):
            for n in names:
                path = os.path.join(root, n)
                if not self.checksums.has(path) and not n.startswith(MANIFEST_PREFIX):
                    self.checksums.record_file(path)
        self.checksums.write_manifest(0, fsync=self.fsync)


def _copy_range(src_fd: int, src_off: int, dst_fd: int, dst_off: int, nbytes: int) -> None:
    """Copy bytes between files in the kernel (copy_file_range), falling back to pread/pwrite."""
    done = 0
    use_kernel = hasattr(os, "copy_file_range")
    while done < nbytes:
        chunk = min(nbytes - done, 1 << 30)
        n = 0
        if use_kernel:
            try:
                n = os.copy_file_range(src_fd, dst_fd, chunk, src_off + done, dst_off + done)
            except OSError:
                use_kernel = False
        if not use_kernel:
            data = os.pread(src_fd, min(chunk, 64 << 20), src_off + done)
            n = os.pwrite(dst_fd, data, dst_off + done) if data else 0
        if n <= 0:
            raise CheckpointFormatError(f"short copy: {nbytes - done} bytes could not be read from a source file")
        done += n


@contextlib.contextmanager
def _no_zip_crc():
    """torch.save without the zip CRC32 of the data (5x faster on large tensors; torch.load and
    :class:`~.tensor_file.TorchFile` do not need it). A no-op on torch versions without the switch."""
    try:
        from torch.utils.serialization import config
        save_config = config.save
        old = save_config.compute_crc32
    except (ImportError, AttributeError):
        yield
        return
    save_config.compute_crc32 = False
    try:
        yield
    finally:
        save_config.compute_crc32 = old
