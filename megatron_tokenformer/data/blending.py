"""Blending several datasets by weight (``--data-path 0.7 PREFIX_A 0.3 PREFIX_B``).

The order is deterministic and low-discrepancy: the ``j``-th sample of dataset ``k`` is
given the ideal time ``(j + 1/2) / w_k`` and samples are served in order of time (ties by
dataset number). Among the first ``N`` samples, dataset ``k`` therefore appears
``N * w_k`` times up to ``1 + K * w_k`` samples (K datasets), for every ``N`` -- not only on
average: the proportions are within 1% once ``N >= 100 * (1 + K)``. (Megatron's greedy
loop keeps within one sample but needs a compiled helper; this is a vectorised sort.)
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["parse_data_prefix", "BlendedDataset"]


def parse_data_prefix(data_prefix: Union[str, Sequence[str]]) -> Tuple[List[str], Optional[List[float]]]:
    """Megatron's ``--data-path`` syntax -> (prefixes, normalised weights or None).

    ``[P]`` -> ([P], [1.0]); ``[w1, P1, w2, P2, ...]`` -> weights normalised to sum 1;
    ``[P1, P2, ...]`` (no numbers) -> weights None (the caller weighs by size).
    A single string is split on whitespace.
    """
    if isinstance(data_prefix, str):
        data_prefix = data_prefix.split()
    items = [str(x) for x in data_prefix]
    if not items:
        raise ValueError("--data-path is empty")

    def is_number(s):
        try:
            float(s)
            return True
        except ValueError:
            return False

    if len(items) == 1:
        if is_number(items[0]):
            raise ValueError(f"--data-path {items[0]}: a weight without a dataset prefix")
        return items, [1.0]
    if not is_number(items[0]):
        bad = [s for s in items if is_number(s)]
        if bad:
            raise ValueError(
                f"--data-path {' '.join(items)}: mixes weights and prefixes; use 'w1 P1 w2 P2 ...'"
            )
        return items, None
    if len(items) % 2:
        raise ValueError(
            f"--data-path {' '.join(items)}: expected pairs 'weight prefix', got an odd count"
        )
    weights, prefixes = [], []
    for w, p in zip(items[0::2], items[1::2]):
        if not is_number(w) or is_number(p):
            raise ValueError(f"--data-path: expected 'weight prefix' pairs, got {w!r} {p!r}")
        wf = float(w)
        if not np.isfinite(wf) or wf < 0:
            raise ValueError(f"--data-path: weight {w} of {p} must be a non-negative number")
        weights.append(wf)
        prefixes.append(p)
    total = sum(weights)
    if total <= 0:
        raise ValueError("--data-path: the weights sum to zero")
    return prefixes, [w / total for w in weights]


class BlendedDataset:
    """Serve ``size`` samples from ``datasets`` in proportion ``weights``.

    ``ds[i]`` is ``datasets[dataset_index[i]][dataset_sample_index[i]]``.
    """

    def __init__(self, datasets: Sequence, weights: Sequence[float], size: int,
                 indices: Optional[Tuple[np.ndarray, np.ndarray]] = None):
        if len(datasets) != len(weights) or not datasets:
            raise ValueError("BlendedDataset: one weight per dataset, at least one dataset")
        w = np.asarray(weights, dtype=np.float64)
        self.datasets = list(datasets)
        self.weights = w / w.sum()
        self.size = int(size)
        if indices is None:
            indices = self.build_indices(self.weights, self.size)
        self.dataset_index, self.dataset_sample_index = indices
        for k, ds in enumerate(self.datasets):
            sel = self.dataset_sample_index[self.dataset_index == k]
            if sel.size and int(sel.max()) >= len(ds):
                raise ValueError(
                    f"BlendedDataset: dataset {k} has {len(ds)} samples, needs {int(sel.max()) + 1}"
                )

    @staticmethod
    def build_indices(weights: Sequence[float], size: int) -> Tuple[np.ndarray, np.ndarray]:
        """(dataset_index [size] int16/int32, dataset_sample_index [size] int64)."""
        w = np.asarray(weights, dtype=np.float64)
        if np.any(w < 0) or w.sum() <= 0:
            raise ValueError("blending weights must be non-negative and not all zero")
        w = w / w.sum()
        ks, js, ts = [], [], []
        for k, wk in enumerate(w):
            if wk <= 0:
                continue
            n = int(np.ceil(size * wk)) + 2
            j = np.arange(n, dtype=np.int64)
            ks.append(np.full(n, k, dtype=np.int32))
            js.append(j)
            ts.append((j + 0.5) / wk)
        k_all, j_all, t_all = np.concatenate(ks), np.concatenate(js), np.concatenate(ts)
        order = np.lexsort((k_all, t_all))[:size]
        kind = np.int16 if len(w) < 2**15 else np.int32
        return k_all[order].astype(kind), j_all[order]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int):
        if idx < 0:
            idx += self.size
        if not 0 <= idx < self.size:
            raise IndexError(f"blended sample {idx} out of range [0, {self.size})")
        k = int(self.dataset_index[idx])
        item = self.datasets[k][int(self.dataset_sample_index[idx])]
        if isinstance(item, dict) and "index" in item:
            item = dict(item, index=idx)  # the blended index: locate() maps it back
        return item

    def locate(self, idx: int, position: int):
        """Where token ``position`` of blended sample ``idx`` comes from (the member dataset's ``locate``)."""
        if idx < 0:
            idx += self.size
        if not 0 <= idx < self.size:
            raise IndexError(f"blended sample {idx} out of range [0, {self.size})")
        k = int(self.dataset_index[idx])
        return self.datasets[k].locate(int(self.dataset_sample_index[idx]), position)

    def __repr__(self) -> str:
        return f"BlendedDataset(size={self.size}, weights={self.weights.round(4).tolist()}, {self.datasets})"

    def check_vocab(self, vocab_size: int) -> None:
        for ds in self.datasets:
            ds.check_vocab(vocab_size)
