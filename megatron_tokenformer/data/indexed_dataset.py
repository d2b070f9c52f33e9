"""Memory-mapped indexed dataset in Megatron-LM's ``MMIDIDX`` format.

A dataset is a pair of files sharing a path prefix:

``PREFIX.bin``
    every token of every sequence, back to back, in one integer dtype (no header).

``PREFIX.idx``
    little-endian, in this order::

        9 bytes   magic   b"MMIDIDX\\x00\\x00"
        <Q        version (always 1)
        <B        dtype code of the .bin (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64,
                  6 float64, 7 float32, 8 uint16)
        <Q        S = number of sequences
        <Q        D = number of entries in the document index (= documents + 1)
        int32[S]  sequence lengths, in tokens
        int64[S]  sequence pointers, byte offset of each sequence in the .bin
        int64[D]  document index: document d is sequences [doc[d], doc[d + 1]);
                  doc[0] = 0 and doc[-1] = S

Files written here are readable by Megatron-LM's ``IndexedDataset`` and vice versa.
A "sequence" is what Megatron calls an item: ``tools/preprocess_data.py`` writes one
sequence per document (no sentence splitting), so sequences and documents coincide.

Besides the pair, the builder writes a small JSON sidecar ``PREFIX.meta.json`` holding
the maximum token id (so ``check_vocab`` is O(1)); it is optional when reading: for files
from elsewhere the maximum is computed once by a chunked scan of the .bin.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import struct
from enum import Enum
from typing import Optional, Sequence

import numpy as np

from megatron_tokenformer.errors import TokenformerError
from megatron_tokenformer.fileio import check_outputs_apart, remove_stale_temporaries, tmp_name

__all__ = [
    "DType",
    "IndexedDataset",
    "IndexedDatasetBuilder",
    "IndexedDatasetError",
    "best_fitting_dtype",
    "data_file_path",
    "index_file_path",
    "meta_file_path",
    "dataset_exists",
]

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# magic (9) + version (8) + dtype code (1) + sequence count (8) + document count (8)
_HEADER_BYTES = 9 + 8 + 1 + 8 + 8

# Streaming chunk, in elements, for every O(N) pass (scan for max id, finalize, merge).
_CHUNK = 1 << 20


class IndexedDatasetError(TokenformerError, ValueError):
    """A .bin/.idx pair that cannot be used; the message names the file."""


class DType(Enum):
    """Megatron-LM's dtype codes of the .bin file."""

    uint8 = 1
    int8 = 2
    int16 = 3
    int32 = 4
    int64 = 5
    float64 = 6
    float32 = 7
    uint16 = 8

    @classmethod
    def code_from_dtype(cls, dtype) -> int:
        return cls[np.dtype(dtype).name].value

    @classmethod
    def dtype_from_code(cls, code: int) -> np.dtype:
        return np.dtype(cls(code).name)


def best_fitting_dtype(vocab_size: Optional[int]) -> np.dtype:
    """uint16 when every id of a ``vocab_size`` vocabulary fits in it, else int32."""
    if vocab_size is not None and vocab_size <= np.iinfo(np.uint16).max + 1:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def data_file_path(prefix: str) -> str:
    return prefix + ".bin"


def index_file_path(prefix: str) -> str:
    return prefix + ".idx"


def meta_file_path(prefix: str) -> str:
    return prefix + ".meta.json"


def dataset_exists(prefix: str) -> bool:
    return os.path.isfile(index_file_path(prefix)) and os.path.isfile(data_file_path(prefix))


def _tmp_name(path: str) -> str:
    return tmp_name(path)


def _names_the_file(method):
    """An OSError without a file name (a buffered write on a full disk: ``[Errno 28] No space left on
    device``) is re-raised naming the dataset file being written."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except OSError as exc:
            if exc.errno is None or exc.filename:
                raise
            raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno), self._final["bin"]) from None
    return wrapper


# --------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------


class IndexedDataset:
    """Read-only, memory-mapped view of a ``PREFIX.bin`` / ``PREFIX.idx`` pair.

    Everything is validated when the dataset is opened, so a bad pair fails before
    training starts: magic, version, dtype code, the .idx size implied by its counts,
    the document index (starts at 0, non-decreasing, ends at the sequence count), the
    pointers (contiguous, consistent with the lengths) and the .bin size.

    ``ds[i]`` is sequence ``i`` as a zero-copy numpy view into the .bin (read-only);
    ``ds.get(i, offset, length)`` a slice of it.
    """

    def __init__(self, path_prefix: str):
        self.path_prefix = path_prefix
        self.idx_path = index_file_path(path_prefix)
        self.bin_path = data_file_path(path_prefix)
        for path in (self.idx_path, self.bin_path):
            if not os.path.isfile(path):
                raise IndexedDatasetError(f"{path}: indexed dataset file not found")
        self._read_index()
        self._open_data()
        self._max_token_id: Optional[int] = None

    # -- index --------------------------------------------------------------------
    def _read_index(self) -> None:
        path = self.idx_path
        size = os.path.getsize(path)
        if size < _HEADER_BYTES:
            raise IndexedDatasetError(
                f"{path}: truncated index ({size} bytes, the header alone is {_HEADER_BYTES})"
            )
        with open(path, "rb") as f:
            head = f.read(_HEADER_BYTES)
        magic = head[:9]
        if magic != INDEX_HEADER:
            raise IndexedDatasetError(
                f"{path}: not an MMIDIDX index (header {magic!r}, expected {INDEX_HEADER!r})"
            )
        (version,) = struct.unpack("<Q", head[9:17])
        if version != INDEX_VERSION:
            raise IndexedDatasetError(f"{path}: unsupported index version {version} (expected 1)")
        (code,) = struct.unpack("<B", head[17:18])
        try:
            self.dtype = DType.dtype_from_code(code)
        except ValueError:
            raise IndexedDatasetError(f"{path}: unknown dtype code {code}") from None
        self.sequence_count, self.document_count = struct.unpack("<QQ", head[18:34])
        s, d = self.sequence_count, self.document_count
        expected = _HEADER_BYTES + 4 * s + 8 * s + 8 * d
        # Megatron's multimodal variant appends one int8 mode per sequence.
        if size not in (expected, expected + s):
            raise IndexedDatasetError(
                f"{path}: index size {size} bytes does not match its header "
                f"({s} sequences, {d} document-index entries need {expected} bytes); "
                "the file is truncated or corrupt"
            )
        if d < 1:
            raise IndexedDatasetError(f"{path}: empty document index (needs at least [0])")
        self._idx_mmap = np.memmap(path, dtype=np.uint8, mode="r")
        buf = self._idx_mmap
        off = _HEADER_BYTES
        self.sequence_lengths = np.frombuffer(buf, dtype=np.int32, count=s, offset=off)
        off += 4 * s
        self.sequence_pointers = np.frombuffer(buf, dtype=np.int64, count=s, offset=off)
        off += 8 * s
        self.document_indices = np.frombuffer(buf, dtype=np.int64, count=d, offset=off)

        docs = self.document_indices
        if docs[0] != 0 or docs[-1] != s or (d > 1 and np.any(np.diff(docs) < 0)):
            raise IndexedDatasetError(
                f"{path}: invalid document index (must start at 0, never decrease and end at "
                f"the sequence count {s}; got first {int(docs[0])}, last {int(docs[-1])})"
            )
        if s and int(self.sequence_lengths.min()) < 0:
            raise IndexedDatasetError(f"{path}: negative sequence length")
        # Token offset of every sequence start, plus the total, as int64.
        starts = np.zeros(s + 1, dtype=np.int64)
        np.cumsum(self.sequence_lengths, dtype=np.int64, out=starts[1:])
        if not np.array_equal(self.sequence_pointers, starts[:-1] * self.dtype.itemsize):
            raise IndexedDatasetError(
                f"{path}: sequence pointers do not match the sequence lengths "
                "(not a contiguous MMIDIDX dataset, or corrupt)"
            )
        self._token_starts = starts

    def _open_data(self) -> None:
        path = self.bin_path
        need = int(self._token_starts[-1]) * self.dtype.itemsize
        size = os.path.getsize(path)
        if size != need:
            what = "truncated" if size < need else "longer than its index says"
            raise IndexedDatasetError(
                f"{path}: data file is {size} bytes but {self.idx_path} describes "
                f"{need} bytes ({self.num_tokens} tokens of {self.dtype.name}); the .bin is {what} "
                "or the pair does not belong together"
            )
        if size == 0:
            self._tokens = np.zeros(0, dtype=self.dtype)
        else:
            self._bin_mmap = np.memmap(path, dtype=self.dtype, mode="r")
            # a plain ndarray view of the mapping: slicing it skips np.memmap's per-slice
            # bookkeeping (several times faster for short slices), still zero-copy
            self._tokens = self._bin_mmap.view(np.ndarray)

    # -- basic accessors --------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return int(self._token_starts[-1])

    @property
    def num_documents(self) -> int:
        return self.document_count - 1

    @property
    def tokens(self) -> np.ndarray:
        """All tokens as one read-only memory-mapped array."""
        return self._tokens

    def __len__(self) -> int:
        return self.sequence_count

    # names used by older Megatron-LM / GPT-NeoX code
    @property
    def sizes(self) -> np.ndarray:
        return self.sequence_lengths

    @property
    def doc_idx(self) -> np.ndarray:
        return self.document_indices

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return [self[i] for i in range(*idx.indices(self.sequence_count))]
        if not isinstance(idx, (int, np.integer)):
            raise TypeError(f"IndexedDataset index must be an int, got {type(idx).__name__}")
        if idx < 0:
            idx += self.sequence_count
        if not 0 <= idx < self.sequence_count:
            raise IndexError(f"sequence {idx} out of range [0, {self.sequence_count})")
        start = self._token_starts[idx]
        return self._tokens[start : self._token_starts[idx + 1]]

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``idx`` (zero-copy)."""
        seq = self[idx]
        end = len(seq) if length is None else offset + length
        return seq[offset:end]

    def document_token_ranges(self) -> tuple[np.ndarray, np.ndarray]:
        """(start token, length) of every document, int64 arrays of shape [num_documents]."""
        bounds = self._token_starts[self.document_indices]
        return bounds[:-1].copy(), np.diff(bounds)

    def get_document(self, doc: int) -> np.ndarray:
        """All tokens of document ``doc`` (its sequences are contiguous in the .bin)."""
        if not 0 <= doc < self.num_documents:
            raise IndexError(f"document {doc} out of range [0, {self.num_documents})")
        a = self._token_starts[self.document_indices[doc]]
        b = self._token_starts[self.document_indices[doc + 1]]
        return self._tokens[a:b]

    # -- vocabulary check -----------------------------------------------------------
    def max_token_id(self) -> int:
        """Largest token id in the .bin (-1 if empty).

        Taken from ``PREFIX.meta.json`` when it matches this pair, else computed once by a
        chunked scan and remembered.
        """
        if self._max_token_id is not None:
            return self._max_token_id
        meta = self._read_meta()
        if meta is not None and "max_token_id" in meta:
            self._max_token_id = int(meta["max_token_id"])
            return self._max_token_id
        best = -1
        toks = self._tokens
        for i in range(0, len(toks), 16 * _CHUNK):
            best = max(best, int(toks[i : i + 16 * _CHUNK].max()))
        self._max_token_id = best
        return best

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ``IndexedDatasetError`` if any token id is >= ``vocab_size``."""
        mx = self.max_token_id()
        if mx >= vocab_size:
            raise IndexedDatasetError(
                f"{self.bin_path}: token id {mx} does not fit the model's vocabulary of "
                f"{vocab_size} (was the dataset made with another tokenizer?)"
            )
        if self.num_tokens and self.dtype.kind == "i" and int(self._min_token_id()) < 0:
            raise IndexedDatasetError(f"{self.bin_path}: negative token id")

    def _min_token_id(self) -> int:
        toks = self._tokens
        return min(int(toks[i : i + 16 * _CHUNK].min()) for i in range(0, len(toks), 16 * _CHUNK))

    def _read_meta(self) -> Optional[dict]:
        path = meta_file_path(self.path_prefix)
        if not os.path.isfile(path):
            return None
        try:
            with open(path) as f:
                meta = json.load(f)
        except (OSError, ValueError):
            return None
        # Only trust a sidecar that describes exactly this pair.
        if (
            meta.get("num_tokens") != self.num_tokens
            or meta.get("num_sequences") != self.sequence_count
            or meta.get("dtype") != self.dtype.name
        ):
            return None
        return meta

    # pickling (DataLoader workers under spawn): send the path, reopen the mapping
    def __getstate__(self):
        return {"path_prefix": self.path_prefix, "max_token_id": self._max_token_id}

    def __setstate__(self, state):
        self.__init__(state["path_prefix"])
        self._max_token_id = state["max_token_id"]

    def __repr__(self) -> str:
        return (
            f"IndexedDataset({self.path_prefix!r}, sequences={self.sequence_count}, "
            f"documents={self.num_documents}, tokens={self.num_tokens}, dtype={self.dtype.name})"
        )


# --------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------


class IndexedDatasetBuilder:
    """Streams sequences into ``PREFIX.bin`` / ``PREFIX.idx`` with flat memory.

    Tokens go straight to a buffered .bin; sequence lengths and document boundaries go to
    two scratch files, so memory does not grow with the corpus. Everything is written under
    temporary names; ``finalize()`` assembles the .idx and renames the files into place
    (the .idx last), so a crash or ``abort()`` never leaves a pair that looks valid.

    Use as a context manager: an exception inside the ``with`` aborts the build::

        with IndexedDatasetBuilder(prefix, dtype=np.uint16) as b:
            b.add_document(tokens)
        # finalized here
    """

    def __init__(self, path_prefix: str, dtype=np.int32, extra_meta: Optional[dict] = None):
        self.path_prefix = path_prefix
        self.dtype = np.dtype(dtype)
        DType.code_from_dtype(self.dtype)  # raises KeyError for a dtype with no code
        self.extra_meta = dict(extra_meta or {})
        d = os.path.dirname(os.path.abspath(path_prefix))
        os.makedirs(d, exist_ok=True)
        self._final = {
            "bin": data_file_path(path_prefix),
            "idx": index_file_path(path_prefix),
            "meta": meta_file_path(path_prefix),
        }
        # temporaries a killed earlier run into this prefix left (their pid is dead): removed
        self.removed_stale = remove_stale_temporaries(
            list(self._final.values()) + [path_prefix + ".lengths", path_prefix + ".docs"])
        self._tmp = {k: _tmp_name(v) for k, v in self._final.items()}
        self._tmp["len"] = _tmp_name(path_prefix + ".lengths")
        self._tmp["doc"] = _tmp_name(path_prefix + ".docs")
        self._bin = open(self._tmp["bin"], "wb", buffering=1 << 22)
        self._len = open(self._tmp["len"], "wb", buffering=1 << 20)
        self._doc = open(self._tmp["doc"], "wb", buffering=1 << 20)
        self._doc.write(np.zeros(1, dtype=np.int64).tobytes())
        self.num_sequences = 0
        self.num_documents = 0
        self.num_tokens = 0
        self.max_token_id = -1
        self._closed = False

    # -- adding data ----------------------------------------------------------------
    @_names_the_file
    def add_item(self, tokens) -> None:
        """Append one sequence (not closing the document)."""
        arr = np.asarray(tokens)
        self._write_tokens(arr)
        self._len.write(np.int32(arr.size).tobytes())
        self.num_sequences += 1

    @_names_the_file
    def end_document(self) -> None:
        self._doc.write(np.int64(self.num_sequences).tobytes())
        self.num_documents += 1

    def add_document(self, tokens) -> None:
        """Append one document made of one sequence."""
        self.add_item(tokens)
        self.end_document()

    @_names_the_file
    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append ``len(lengths)`` one-sequence documents stored back to back in ``tokens``.

        The bulk path used by preprocessing: one write per batch, no per-document Python.
        """
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != int(np.asarray(tokens).size):
            raise ValueError("add_documents: lengths do not sum to the number of tokens")
        if lengths.size and int(lengths.max()) > np.iinfo(np.int32).max:
            raise ValueError("add_documents: a document is longer than 2**31-1 tokens")
        self._write_tokens(np.asarray(tokens))
        self._len.write(lengths.astype(np.int32).tobytes())
        ends = self.num_sequences + np.arange(1, lengths.size + 1, dtype=np.int64)
        self._doc.write(ends.tobytes())
        self.num_sequences += int(lengths.size)
        self.num_documents += int(lengths.size)

    def _write_tokens(self, arr: np.ndarray) -> None:
        if arr.size == 0:
            return
        if arr.dtype != self.dtype:
            if arr.dtype.kind in "iu":
                lo, hi = int(arr.min()), int(arr.max())
                info = np.iinfo(self.dtype)
                if lo < info.min or hi > info.max:
                    raise ValueError(
                        f"{self._final['bin']}: token id {hi if hi > info.max else lo} does not fit "
                        f"{self.dtype.name}"
                    )
            arr = arr.astype(self.dtype)
        self.max_token_id = max(self.max_token_id, int(arr.max()))
        self._bin.write(np.ascontiguousarray(arr).tobytes())
        self.num_tokens += int(arr.size)

    @_names_the_file
    def add_index(self, other_prefix: str) -> None:
        """Append every document of another dataset (the merge operation)."""
        other = IndexedDataset(other_prefix)
        if other.dtype != self.dtype and other.num_tokens:
            info = np.iinfo(self.dtype)
            lo, hi = other._min_token_id(), other.max_token_id()
            if lo < info.min or hi > info.max:
                raise ValueError(
                    f"{other.bin_path}: token ids [{lo}, {hi}] do not fit the output dtype "
                    f"{self.dtype.name}"
                )
        toks = other.tokens
        if other.dtype == self.dtype:
            with open(other.bin_path, "rb") as src:
                shutil.copyfileobj(src, self._bin, 1 << 24)
        else:
            for i in range(0, len(toks), 16 * _CHUNK):
                self._bin.write(toks[i : i + 16 * _CHUNK].astype(self.dtype).tobytes())
        self.num_tokens += other.num_tokens
        if other.num_tokens:
            self.max_token_id = max(self.max_token_id, other.max_token_id())
        for i in range(0, other.sequence_count, _CHUNK):
            self._len.write(other.sequence_lengths[i : i + _CHUNK].tobytes())
        docs = other.document_indices
        for i in range(1, len(docs), _CHUNK):
            self._doc.write((docs[i : i + _CHUNK] + self.num_sequences).astype(np.int64).tobytes())
        self.num_sequences += other.sequence_count
        self.num_documents += other.num_documents
        del other

    # -- finishing ------------------------------------------------------------------
    @_names_the_file
    def finalize(self) -> None:
        """Write the .idx and move the pair into place (the .idx last)."""
        if self._closed:
            raise RuntimeError("IndexedDatasetBuilder already closed")
        try:
            for f in (self._bin, self._len, self._doc):
                f.close()
            self._write_index()
            with open(self._tmp["meta"], "w") as f:
                json.dump(
                    {
                        "format": "MMIDIDX",
                        "dtype": self.dtype.name,
                        "num_sequences": self.num_sequences,
                        "num_documents": self.num_documents,
                        "num_tokens": self.num_tokens,
                        "max_token_id": self.max_token_id,
                        **self.extra_meta,
                    },
                    f,
                    indent=1,
                )
            # Drop an old .idx first: until the new one lands, no valid-looking pair exists.
            if os.path.exists(self._final["idx"]):
                os.remove(self._final["idx"])
            os.replace(self._tmp["meta"], self._final["meta"])
            os.replace(self._tmp["bin"], self._final["bin"])
            os.replace(self._tmp["idx"], self._final["idx"])
        except BaseException:
            self.abort()
            raise
        finally:
            for k in ("len", "doc"):
                _silent_remove(self._tmp[k])
        self._closed = True

    def _write_index(self) -> None:
        s, d = self.num_sequences, self.num_documents + 1
        itemsize = self.dtype.itemsize
        with open(self._tmp["idx"], "wb", buffering=1 << 22) as out:
            out.write(INDEX_HEADER)
            out.write(struct.pack("<Q", INDEX_VERSION))
            out.write(struct.pack("<B", DType.code_from_dtype(self.dtype)))
            out.write(struct.pack("<QQ", s, d))
            with open(self._tmp["len"], "rb") as f:
                shutil.copyfileobj(f, out, 1 << 22)
            # Pointers from the lengths, a chunk at a time (flat memory).
            base = 0
            with open(self._tmp["len"], "rb") as f:
                while True:
                    lens = np.frombuffer(f.read(4 * _CHUNK), dtype=np.int32)
                    if lens.size == 0:
                        break
                    ptr = np.empty(lens.size, dtype=np.int64)
                    ptr[0] = 0
                    np.cumsum(lens[:-1], dtype=np.int64, out=ptr[1:])
                    out.write(((ptr + base) * itemsize).tobytes())
                    base += int(lens.sum(dtype=np.int64))
            with open(self._tmp["doc"], "rb") as f:
                shutil.copyfileobj(f, out, 1 << 22)

    def abort(self) -> None:
        """Close and delete everything written so far."""
        for f in (self._bin, self._len, self._doc):
            try:
                f.close()
            except Exception:
                pass
        for path in self._tmp.values():
            _silent_remove(path)
        self._closed = True

    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            if not self._closed:
                self.abort()
        elif not self._closed:
            self.finalize()


def _silent_remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def merge_datasets(input_prefixes: Sequence[str], output_prefix: str, dtype=None) -> IndexedDataset:
    """Concatenate datasets into ``output_prefix``; the widest input dtype is kept."""
    if not input_prefixes:
        raise ValueError("merge_datasets: no input datasets")
    opened = [IndexedDataset(p) for p in input_prefixes]  # validates all before writing
    if dtype is None:
        dtype = np.result_type(*[d.dtype for d in opened])
        if dtype.kind == "f":
            raise IndexedDatasetError("merge_datasets: floating point token files are not supported")
    out_abs = os.path.abspath(output_prefix)
    for p in input_prefixes:
        if os.path.abspath(p) == out_abs:
            raise ValueError(f"merge_datasets: output prefix {output_prefix} is also an input")
    outputs = [("--output-prefix", data_file_path(output_prefix)), ("--output-prefix", index_file_path(output_prefix))]
    check_outputs_apart(outputs, [("--input", f(p)) for p in input_prefixes for f in (data_file_path, index_file_path)])
    del opened
    with IndexedDatasetBuilder(output_prefix, dtype=dtype) as builder:
        for p in input_prefixes:
            builder.add_index(p)
    return IndexedDataset(output_prefix)
