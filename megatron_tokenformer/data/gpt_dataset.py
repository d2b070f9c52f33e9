"""GPT-style pretraining samples packed from an indexed dataset.

Each sample is ``seq_length + 1`` consecutive tokens of a stream made by concatenating the
documents of one split in a shuffled order (a new order every epoch); samples cross
document boundaries (end-of-document tokens, when preprocessing appended them, mark
them). Sample ``i`` starts at stream token ``i * seq_length``, so consecutive samples share
one token, as in Megatron-LM: ``tokens = text[:-1]``, ``labels = text[1:]``.

Three index arrays are built once, on one process, and cached as ``.npy`` files (in
``index-cache/`` next to the data, or in ``cache_dir``); every rank loads the same files (memory-mapped):

``doc_idx``     [E * D]        document ids in stream order (E epochs of the D split documents)
``sample_idx``  [S + 1, 2]     (position in doc_idx, token offset in that document) where
                               sample i starts; sample i ends where sample i + 1 starts (+1 token)
``shuffle_idx`` [S]            the order samples are served in. With E > 1 the samples of
                               the first E - 1 epochs and those of the last epoch are shuffled
                               separately, so a partly used last epoch does not displace data
                               not yet seen.

Cache files are named by a hash of everything that determines them (the data's document
lengths, split range, sample count, sequence length, seed). Builders take a file lock and
write each file under a temporary name then rename it, so concurrent builders (ranks, jobs)
never see a half-written file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from megatron_tokenformer.fileio import atomic_path, atomic_write_text

from .batch_check import locate_in_documents
from .blending import BlendedDataset, parse_data_prefix
from .indexed_dataset import IndexedDataset, IndexedDatasetError

__all__ = [
    "GPTDataset",
    "MockGPTDataset",
    "parse_split",
    "split_document_ranges",
    "build_train_valid_test_datasets",
]

logger = logging.getLogger(__name__)

_INDEX_VERSION = 1  # bump when the index construction changes
_SPLIT_NAMES = ("train", "valid", "test")


# --------------------------------------------------------------------------------------
# splits
# --------------------------------------------------------------------------------------


def parse_split(split: str) -> List[float]:
    """``"969,30,1"`` (or ``"969/30/1"``) -> three fractions summing to 1."""
    text = str(split).replace("/", ",")
    try:
        parts = [float(s) for s in text.split(",") if s.strip() != ""]
    except ValueError:
        raise ValueError(f"--split {split!r}: expected up to three numbers like 969,30,1") from None
    if not parts or len(parts) > 3 or any(p < 0 for p in parts):
        raise ValueError(f"--split {split!r}: expected up to three non-negative numbers like 969,30,1")
    parts += [0.0] * (3 - len(parts))
    total = sum(parts)
    if total <= 0:
        raise ValueError(f"--split {split!r}: the weights sum to zero")
    return [p / total for p in parts]


def split_document_ranges(split: str, num_documents: int) -> List[Tuple[int, int]]:
    """Contiguous document ranges ``[(b, e)] * 3`` for train/valid/test (Megatron's rounding)."""
    fr = parse_split(split)
    bounds = [0]
    for f in fr:
        bounds.append(bounds[-1] + int(round(f * num_documents)))
    diff = bounds[-1] - num_documents
    for i in range(1, 4):
        bounds[i] -= diff
    bounds = [min(max(b, 0), num_documents) for b in bounds]
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


# --------------------------------------------------------------------------------------
# cache helpers
# --------------------------------------------------------------------------------------


class _FileLock:
    """Exclusive advisory lock on a file (fcntl.flock); only mutual exclusion where fcntl exists."""

    def __init__(self, path: str):
        self.path = path
        self._f = None

    def acquire(self) -> None:
        self._f = open(self.path, "a+")  # OSError on a read-only folder
        try:
            import fcntl
        except ImportError:  # pragma: no cover - non-POSIX: atomic renames still protect readers
            return
        fcntl.flock(self._f.fileno(), fcntl.LOCK_EX)

    def release(self) -> None:
        if self._f is not None:
            try:
                import fcntl

                fcntl.flock(self._f.fileno(), fcntl.LOCK_UN)
            except ImportError:  # pragma: no cover
                pass
            self._f.close()
            self._f = None


def _atomic_save(path: str, array: np.ndarray) -> None:
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, array, allow_pickle=False)


# --------------------------------------------------------------------------------------
# index construction (pure numpy, deterministic)
# --------------------------------------------------------------------------------------


def _num_epochs(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    # need E * tokens_per_epoch - 1 >= num_samples * seq_length (the +1 token of the last sample)
    need = num_samples * seq_length + 1
    return max(1, -(-need // tokens_per_epoch))


def build_sample_indices(doc_ids: np.ndarray, doc_lengths: np.ndarray, seq_length: int,
                         num_samples: int, seed: int):
    """Returns ``doc_idx, sample_idx, shuffle_idx`` (see the module doc).

    ``doc_ids`` [D]: the split's document ids; ``doc_lengths`` [D]: their token counts.
    """
    doc_lengths = np.asarray(doc_lengths, dtype=np.int64)
    tokens_per_epoch = int(doc_lengths.sum())
    epochs = _num_epochs(tokens_per_epoch, seq_length, num_samples)
    rng = np.random.RandomState(seed)
    id_dtype = np.int32 if len(doc_ids) == 0 or int(np.max(doc_ids)) < 2**31 - 1 else np.int64
    order = np.concatenate([rng.permutation(len(doc_ids)) for _ in range(epochs)])
    doc_idx = np.asarray(doc_ids, dtype=id_dtype)[order]
    total_tokens = epochs * tokens_per_epoch
    total_samples = (total_tokens - 1) // seq_length
    ends = np.cumsum(doc_lengths[order], dtype=np.int64)  # stream position after each doc
    starts = np.arange(total_samples + 1, dtype=np.int64) * seq_length
    pos = np.searchsorted(ends, starts, side="right")  # first doc whose end is past the start
    prev_end = np.where(pos > 0, ends[np.maximum(pos - 1, 0)], 0)
    sample_dtype = np.int32 if max(len(doc_idx), int(doc_lengths.max(initial=0))) < 2**31 - 1 else np.int64
    sample_idx = np.stack([pos, starts - prev_end], axis=1).astype(sample_dtype)
    if epochs == 1:
        shuffle_idx = rng.permutation(total_samples)
    else:
        first = ((epochs - 1) * tokens_per_epoch - 1) // seq_length
        shuffle_idx = np.concatenate(
            [rng.permutation(first), first + rng.permutation(total_samples - first)]
        )
    shuffle_dtype = np.int32 if total_samples < 2**31 - 1 else np.int64
    return doc_idx, sample_idx, shuffle_idx.astype(shuffle_dtype)


# --------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------


class GPTDataset:
    """Packed ``seq_length + 1`` token samples of documents ``[doc_begin, doc_end)``.

    ``len(ds)`` is the number of samples in all the epochs needed to provide
    ``num_samples`` (>= num_samples); ``ds[i] -> {"text": int64 array [seq_length + 1], "index": i}``.
    """

    def __init__(self, indexed_dataset: IndexedDataset, name: str, document_range: Tuple[int, int],
                 num_samples: int, seq_length: int, seed: int, cache_dir: Optional[str] = None):
        self.indexed_dataset = indexed_dataset
        self.name = name
        self.seq_length = int(seq_length)
        self.seed = int(seed)
        self.num_samples = int(num_samples)
        path = indexed_dataset.path_prefix
        if self.seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {seq_length}")
        if self.num_samples < 1:
            raise ValueError(f"{name} dataset of {path}: num_samples must be >= 1, got {num_samples}")
        b, e = document_range
        if e <= b:
            raise IndexedDatasetError(
                f"{path}: the {name} split is empty (documents [{b}, {e}) of "
                f"{indexed_dataset.num_documents}); change --split or add data"
            )
        starts, lengths = indexed_dataset.document_token_ranges()
        self._doc_starts = starts
        self._doc_lengths = lengths
        doc_ids = np.arange(b, e, dtype=np.int64)
        split_lengths = lengths[b:e]
        if int(split_lengths.sum()) == 0:
            raise IndexedDatasetError(
                f"{path}: the {name} split (documents [{b}, {e})) holds no tokens"
            )
        self.document_range = (b, e)
        self._tokens = indexed_dataset.tokens
        self.doc_idx, self.sample_idx, self.shuffle_idx = self._load_or_build(
            doc_ids, split_lengths, cache_dir
        )
        self._make_views()

    def _make_views(self):
        # plain ndarray views of the memory-mapped arrays: cheaper element access than np.memmap
        self._doc_idx_a = self.doc_idx.view(np.ndarray)
        self._sample_idx_a = self.sample_idx.view(np.ndarray)
        self._shuffle_idx_a = self.shuffle_idx.view(np.ndarray)
        self._n = int(self.shuffle_idx.shape[0])

    # pickling (DataLoader workers under spawn): send paths, not the mapped arrays
    _MAPPED = ("_tokens", "_doc_starts", "_doc_lengths", "doc_idx", "sample_idx", "shuffle_idx",
               "_doc_idx_a", "_sample_idx_a", "_shuffle_idx_a")

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in self._MAPPED}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._tokens = self.indexed_dataset.tokens
        self._doc_starts, self._doc_lengths = self.indexed_dataset.document_token_ranges()
        arrays = self._try_load(self.cache_paths)
        if arrays is None:
            raise IndexedDatasetError(f"sample index files missing: {self.cache_paths['shuffle_idx']}")
        self.doc_idx, self.sample_idx, self.shuffle_idx = arrays
        self._make_views()

    # -- cache ----------------------------------------------------------------------
    def _description(self, split_lengths: np.ndarray) -> dict:
        ds = self.indexed_dataset
        return {
            "class": "GPTDataset",
            "index_version": _INDEX_VERSION,
            "path_prefix": os.path.basename(ds.path_prefix),
            "num_tokens": ds.num_tokens,
            "num_documents": ds.num_documents,
            "document_range": list(self.document_range),
            "document_lengths_md5": hashlib.md5(
                np.ascontiguousarray(split_lengths, dtype=np.int64).tobytes()
            ).hexdigest(),
            "name": self.name,
            "num_samples": self.num_samples,
            "seq_length": self.seq_length,
            "seed": self.seed,
        }

    def _load_or_build(self, doc_ids, split_lengths, cache_dir):
        desc = self._description(split_lengths)
        text = json.dumps(desc, indent=1, sort_keys=True)
        digest = hashlib.md5(text.encode()).hexdigest()
        prefix = self.indexed_dataset.path_prefix
        cache_dir = cache_dir or os.path.join(os.path.dirname(os.path.abspath(prefix)), "index-cache")
        try:
            os.makedirs(cache_dir, exist_ok=True)
        except OSError as e:
            raise IndexedDatasetError(
                f"cannot create the dataset index cache folder {cache_dir} ({e}); "
                "pass a writable --data-cache-path"
            ) from None
        base = os.path.join(cache_dir, f"{os.path.basename(prefix)}-{self.name}-{digest}")
        paths = {k: f"{base}-{k}.npy" for k in ("doc_idx", "sample_idx", "shuffle_idx")}
        self.cache_paths = paths
        # fast path, no lock: the files of one name are complete (atomic renames) and any two
        # builders write identical bytes, so whatever is there can be used
        arrays = self._try_load(paths)
        if arrays is not None:
            self.built_cache = False
            return arrays
        lock = _FileLock(base + ".lock")
        try:
            lock.acquire()
        except OSError as e:
            raise IndexedDatasetError(
                f"cannot build the sample index in {cache_dir} ({e}); pass a writable --data-cache-path"
            ) from None
        try:
            arrays = self._try_load(paths)
            if arrays is None:
                logger.info("building %s sample index for %s", self.name, prefix)
                arrays = build_sample_indices(doc_ids, split_lengths, self.seq_length,
                                              self.num_samples, self.seed)
                atomic_write_text(base + "-description.json", text, fsync=False)
                for k, a in zip(("doc_idx", "sample_idx", "shuffle_idx"), arrays):
                    _atomic_save(paths[k], a)
                self.built_cache = True
                arrays = self._try_load(paths)
                if arrays is None:  # pragma: no cover - disk trouble
                    raise IndexedDatasetError(f"could not read back the sample index {base}-*.npy")
            else:
                self.built_cache = False
        finally:
            lock.release()
        return arrays

    def _try_load(self, paths):
        try:
            doc_idx = np.load(paths["doc_idx"], mmap_mode="r", allow_pickle=False)
            sample_idx = np.load(paths["sample_idx"], mmap_mode="r", allow_pickle=False)
            shuffle_idx = np.load(paths["shuffle_idx"], mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError):
            return None
        n = shuffle_idx.shape[0]
        if (
            sample_idx.ndim != 2 or sample_idx.shape != (n + 1, 2) or n < self.num_samples
            or doc_idx.ndim != 1
        ):
            return None
        return doc_idx, sample_idx, shuffle_idx

    # -- access ---------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.shuffle_idx.shape[0])

    def get_text(self, idx: int) -> np.ndarray:
        """Sample ``idx`` (after shuffling) as an int64 array [seq_length + 1]."""
        n = self._n
        if idx < 0:
            idx += n
        if not 0 <= idx < n:
            raise IndexError(f"{self.name} sample {idx} out of range [0, {n})")
        i = int(self._shuffle_idx_a[idx])
        (j0, o0), (j1, o1) = self._sample_idx_a[i : i + 2].tolist()
        toks, starts = self._tokens, self._doc_starts
        if j0 == j1:
            s = int(starts[self._doc_idx_a[j0]])
            return toks[s + o0 : s + o1 + 1].astype(np.int64)
        docs = self._doc_idx_a[j0 : j1 + 1]
        piece_starts = starts[docs]
        piece_lens = self._doc_lengths[docs]
        piece_starts[0] += o0
        piece_lens[0] -= o0
        piece_lens[-1] = o1 + 1
        if docs.size <= 8:
            return np.concatenate(
                [toks[a : a + n] for a, n in zip(piece_starts.tolist(), piece_lens.tolist())]
            ).astype(np.int64)
        # many short documents: one gather instead of a Python loop over pieces
        out_offsets = np.cumsum(piece_lens) - piece_lens
        index = np.repeat(piece_starts - out_offsets, piece_lens)
        index += np.arange(self.seq_length + 1, dtype=np.int64)
        return toks[index].astype(np.int64)

    def __getitem__(self, idx: int) -> dict:
        """``{"text": int64 [seq_length + 1], "index": idx}`` (the index lets a batch check name the document)."""
        return {"text": self.get_text(idx), "index": idx}

    def locate(self, idx: int, position: int) -> Tuple[str, int, int]:
        """``(.bin path, document, token offset in the document)`` of token ``position`` of sample ``idx``."""
        n = self._n
        if idx < 0:
            idx += n
        if not 0 <= idx < n or not 0 <= position <= self.seq_length:
            raise IndexError(f"{self.name} sample {idx}, position {position}: out of range")
        i = int(self._shuffle_idx_a[idx])
        j0, o0 = (int(v) for v in self._sample_idx_a[i])
        document, offset = locate_in_documents(self._doc_idx_a, self._doc_lengths, j0, o0, position)
        return self.indexed_dataset.bin_path, document, offset

    def check_vocab(self, vocab_size: int) -> None:
        """Raise naming the .bin file if a token id is >= ``vocab_size``."""
        self.indexed_dataset.check_vocab(vocab_size)

    def __repr__(self) -> str:
        return (
            f"GPTDataset({self.indexed_dataset.path_prefix!r}, {self.name}, "
            f"documents={self.document_range}, samples={len(self)}, seq_length={self.seq_length})"
        )


class MockGPTDataset:
    """Random tokens in ``[0, vocab_size)``, same item format as GPTDataset (for --mock-data).

    ``ds[i]`` depends only on ``(seed, i)``.
    """

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int = 1234):
        if num_samples < 1 or seq_length < 1 or vocab_size < 1:
            raise ValueError("MockGPTDataset: num_samples, seq_length and vocab_size must be >= 1")
        self.num_samples = int(num_samples)
        self.seq_length = int(seq_length)
        self.vocab_size = int(vocab_size)
        self.seed = int(seed)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> dict:
        if idx < 0:
            idx += self.num_samples
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"mock sample {idx} out of range [0, {self.num_samples})")
        rng = np.random.default_rng([self.seed, int(idx)])
        return {"text": rng.integers(0, self.vocab_size, self.seq_length + 1, dtype=np.int64), "index": idx}

    def check_vocab(self, vocab_size: int) -> None:
        if self.vocab_size > vocab_size:
            raise ValueError(f"mock data vocabulary {self.vocab_size} exceeds the model's {vocab_size}")


# --------------------------------------------------------------------------------------
# Megatron's entry point
# --------------------------------------------------------------------------------------


def build_train_valid_test_datasets(
    data_prefix: Union[Sequence[str], str],
    split: str,
    seq_length: int,
    train_valid_test_num_samples: Sequence[int],
    seed: int,
    cache_dir: Optional[str] = None,
    vocab_size: Optional[int] = None,
):
    """Build (train, valid, test) datasets from ``--data-path`` and ``--split``.

    ``data_prefix``: ``[PREFIX]``, ``[w1, P1, w2, P2, ...]`` (weights, Megatron syntax) or
    ``[P1, P2, ...]`` (weights proportional to each dataset's tokens in the split).
    Each split is a contiguous document range of every dataset. A split with weight 0 or
    0 requested samples is ``None``. An empty train split raises naming the file. With
    ``vocab_size`` every dataset is checked against the model's vocabulary first.
    """
    prefixes, weights = parse_data_prefix(data_prefix)
    if len(train_valid_test_num_samples) != 3:
        raise ValueError("train_valid_test_num_samples must have three entries")
    fractions = parse_split(split)
    indexed = [IndexedDataset(p) for p in prefixes]  # validates every pair up front
    if vocab_size is not None:
        for ds in indexed:
            ds.check_vocab(vocab_size)
    ranges = [split_document_ranges(split, ds.num_documents) for ds in indexed]

    results = []
    for s, name in enumerate(_SPLIT_NAMES):
        n = int(train_valid_test_num_samples[s])
        if fractions[s] == 0 or n <= 0:
            if s == 0 and n > 0:
                raise IndexedDatasetError(
                    f"--split {split} leaves the train set empty (data: {', '.join(prefixes)})"
                )
            results.append(None)
            continue
        members = []
        for k, ds in enumerate(indexed):
            b, e = ranges[k][s]
            tokens = int(ds.document_token_ranges()[1][b:e].sum()) if e > b else 0
            if tokens == 0:
                if s == 0:
                    raise IndexedDatasetError(
                        f"{ds.path_prefix}: --split {split} leaves the train set empty "
                        f"({ds.num_documents} documents, train range [{b}, {e}) has no tokens)"
                    )
                logger.warning("%s: the %s split is empty; it is left out", ds.path_prefix, name)
                continue
            w = weights[k] if weights is not None else float(tokens)
            members.append((k, (b, e), w))
        if not members:
            results.append(None)
            continue
        if len(members) == 1:
            k, rng, _ = members[0]
            results.append(GPTDataset(indexed[k], name, rng, n, seq_length, seed, cache_dir))
            continue
        ws = np.array([m[2] for m in members], dtype=np.float64)
        blended_index = BlendedDataset.build_indices(ws / ws.sum(), n)
        counts = np.bincount(blended_index[0], minlength=len(members))
        parts = [
            GPTDataset(indexed[k], name, rng, max(int(c), 1), seq_length, seed, cache_dir)
            for (k, rng, _), c in zip(members, counts)
        ]
        results.append(BlendedDataset(parts, ws / ws.sum(), n, indices=blended_index))
    return tuple(results)
