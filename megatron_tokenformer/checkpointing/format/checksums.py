"""Checksums of every file of a step folder: recorded at save, verified before anything is loaded.

Each process that writes files into a step folder records, per file, its size and its xxh3-64 hash
(``xxhash``; 13 GB per CPU-second measured, so a save or load pays little for it) and writes them into its manifest
``tokenformer_checksums_rank_<R>.json`` (training: one per rank; the tools: one, rank 0)::

    {"algorithm": "xxh3_64", "files": {"<path relative to the step folder>": [size, "<hex>"], ...},
     "digest": "<xxh3-64 of the files entry>"}

The hash is computed while writing where the bytes pass through the process (``torch.save`` into a
:class:`HashingWriter`: DeepSpeed's checkpoint engine, the RNG files, canonical tensors); files
assembled by copying in the kernel (``copy_file_range``) and small files (JSON, tokenizer) are read
back once. The metadata lists the manifests (``"checksums": {"algorithm", "manifests"}``), so a
lost manifest is noticed. :func:`expected_checksums` reads the manifests of a step (None for a step
written before checksums existed: it loads unverified); :func:`verify_file` compares one file.
"""

from __future__ import annotations

import json
import mmap
import os
from typing import Dict, List, Optional, Tuple

from megatron_tokenformer.checkpointing.format.entries import CheckpointFormatError
from megatron_tokenformer.fileio import durable_write

__all__ = ["ALGORITHM", "MANIFEST_PREFIX", "ChecksumError", "HashingWriter", "ChecksumRecorder", "manifest_name",
           "manifest_names", "metadata_entry", "read_manifest", "expected_manifests", "expected_checksums",
           "hash_file", "verify_file", "new_hasher"]

ALGORITHM = "xxh3_64"
MANIFEST_PREFIX = "tokenformer_checksums_rank_"


class ChecksumError(CheckpointFormatError):
    """A file's bytes differ from what was recorded when it was written (one line naming it)."""


def new_hasher():
    import xxhash
    return xxhash.xxh3_64()


def manifest_name(rank: int) -> str:
    return f"{MANIFEST_PREFIX}{int(rank):05d}.json"


def manifest_names(step_dir: str) -> List[str]:
    """The manifests present in ``step_dir`` (sorted)."""
    try:
        return sorted(n for n in os.listdir(step_dir) if n.startswith(MANIFEST_PREFIX) and n.endswith(".json"))
    except OSError:
        return []


class HashingWriter:
    """A binary file object that hashes every byte written through it (``torch.save`` writes its zip
    archive sequentially, so the hash is the file's)."""

    def __init__(self, f):
        self._f = f
        self._hasher = new_hasher()
        self.size = 0
        self.name = getattr(f, "name", "")  # the path, as a file object has it (for whoever logs or matches it)

    def write(self, data) -> int:
        view = memoryview(data)
        self._hasher.update(view)
        self._f.write(view)
        self.size += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        self._f.flush()

    def fileno(self) -> int:
        return self._f.fileno()

    def hexdigest(self) -> str:
        return self._hasher.hexdigest()


def hash_file(path: str) -> Tuple[int, str]:
    """(size, xxh3-64 hex digest) of a file, hashed through a read-only memory map (no copy of the bytes
    into the process: half the CPU time of reading them in chunks, measured in benchmarks/checksums.py)."""
    hasher = new_hasher()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                hasher.update(m)
                size = len(m)
    return size, hasher.hexdigest()


def _files_digest(files: Dict[str, List]) -> str:
    hasher = new_hasher()
    hasher.update(json.dumps(files, sort_keys=True).encode())
    return hasher.hexdigest()


class ChecksumRecorder:
    """The checksums one process records for the files it writes into ``step_dir``."""

    def __init__(self, step_dir: str):
        self.step_dir = os.path.abspath(step_dir)
        self.files: Dict[str, List] = {}

    def _rel(self, path: str) -> str:
        return os.path.relpath(os.path.abspath(path), self.step_dir)

    def record(self, path: str, size: int, digest: str) -> None:
        self.files[self._rel(path)] = [int(size), digest]

    def record_writer(self, path: str, writer: HashingWriter) -> None:
        self.record(path, writer.size, writer.hexdigest())

    def record_file(self, path: str) -> None:
        """Hash a file written without passing through the process (kernel copies, small files)."""
        self.record(path, *hash_file(path))

    def has(self, path: str) -> bool:
        return self._rel(path) in self.files

    def write_manifest(self, rank: int, fsync: bool = True) -> str:
        path = os.path.join(self.step_dir, manifest_name(rank))
        body = {"algorithm": ALGORITHM, "files": self.files, "digest": _files_digest(self.files)}
        with durable_write(path, "w", fsync=fsync) as f:
            json.dump(body, f, indent=1, sort_keys=True)
            f.write("\n")
        return path


def metadata_entry(world_size: int) -> Dict[str, object]:
    """What the metadata says about the step's checksums (``meta["checksums"]``)."""
    return {"algorithm": ALGORITHM, "manifests": [manifest_name(r) for r in range(int(world_size))]}


def read_manifest(step_dir: str, name: str) -> Dict[str, Tuple[int, str]]:
    """relative path -> (size, digest) of one manifest; ChecksumError naming it when missing or damaged."""
    path = os.path.join(step_dir, name)
    try:
        with open(path) as f:
            body = json.load(f)
        files = body["files"]
        if body.get("algorithm") != ALGORITHM:
            raise ChecksumError(f"checksum manifest {path} uses {body.get('algorithm')!r}; this version knows "
                                f"{ALGORITHM}")
        if body.get("digest") != _files_digest(files):
            raise ChecksumError(f"checksum manifest {path} is damaged (its own digest does not match)")
        return {rel: (int(v[0]), str(v[1])) for rel, v in files.items()}
    except FileNotFoundError:
        raise ChecksumError(f"checksum manifest {path} is missing (the metadata lists it)") from None
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        if isinstance(exc, ChecksumError):
            raise
        raise ChecksumError(f"checksum manifest {path} cannot be read: "
                            f"{(str(exc).splitlines() or [type(exc).__name__])[0]}") from None


def expected_manifests(step_dir: str, meta: Optional[Dict]) -> List[str]:
    """The manifests a step must have: those its metadata lists, and any present; [] for a step
    written before checksums existed."""
    listed = list(((meta or {}).get("checksums") or {}).get("manifests") or [])
    return sorted(set(listed) | set(manifest_names(step_dir)))


def expected_checksums(step_dir: str, meta: Optional[Dict],
                       names: Optional[List[str]] = None) -> Optional[Dict[str, Tuple[int, str]]]:
    """relative path -> (size, digest) from the manifests ``names`` (default: all the step must have);
    None when the step has no checksums (written before they existed)."""
    names = expected_manifests(step_dir, meta) if names is None else names
    if not names and not ((meta or {}).get("checksums")):
        return None
    out: Dict[str, Tuple[int, str]] = {}
    for name in names:
        out.update(read_manifest(step_dir, name))
    return out


def verify_file(step_dir: str, rel: str, expected: Tuple[int, str]) -> Optional[str]:
    """None when the file matches its recorded size and hash, else the problem (one line, path first)."""
    path = os.path.join(step_dir, rel)
    size, digest = expected
    try:
        actual_size = os.path.getsize(path)
        if actual_size != size:
            return f"{path} has {actual_size} bytes; {size} were written (truncated or replaced)"
        actual = hash_file(path)[1]
    except FileNotFoundError:
        return f"{path} is missing (the step's checksums list it)"
    except OSError as exc:
        return f"{path} cannot be read: {exc.strerror or exc}"
    if actual != digest:
        return (f"{path} is corrupt: its {ALGORITHM} checksum is {actual}, {digest} was recorded when it was "
                "written (a changed byte)")
    return None
