"""--data-path parsing and blending proportions."""

import numpy as np
import pytest

from megatron_tokenformer.data.blending import BlendedDataset, parse_data_prefix
from megatron_tokenformer.data.gpt_dataset import build_train_valid_test_datasets
from megatron_tokenformer.data.indexed_dataset import IndexedDatasetBuilder


def test_parse_data_prefix():
    assert parse_data_prefix(["a"]) == (["a"], [1.0])
    p, w = parse_data_prefix(["0.7", "A", "0.3", "B"])
    assert p == ["A", "B"] and np.allclose(w, [0.7, 0.3])
    p, w = parse_data_prefix("2 A 6 B")  # weights are normalised
    assert p == ["A", "B"] and np.allclose(w, [0.25, 0.75])
    assert parse_data_prefix(["A", "B"]) == (["A", "B"], None)
    for bad, msg in [(["0.5", "A", "0.5"], "odd"), (["0.5"], "without a dataset"),
                     (["A", "0.5", "B"], "mixes"), (["0", "A", "0", "B"], "sum to zero"),
                     (["-1", "A", "2", "B"], "non-negative"), ([], "empty"),
                     (["0.5", "0.5", "A", "B"], "pairs")]:
        with pytest.raises(ValueError, match=msg):
            parse_data_prefix(bad)


@pytest.mark.parametrize("weights", [[0.7, 0.3], [0.5, 0.3, 0.2], [0.01, 0.99], [1, 1, 1, 1, 1, 1, 7]])
def test_blend_indices_track_weights_at_every_prefix(weights):
    size = 5000
    ds_index, sample_index = BlendedDataset.build_indices(weights, size)
    w = np.asarray(weights, float) / sum(weights)
    counts = np.zeros(len(w), dtype=np.int64)
    for n, k in enumerate(ds_index, start=1):
        counts[k] += 1
        # every prefix is within 1 + K * w_k samples of its share (the bound in blending.py)
        assert np.all(np.abs(counts - n * w) <= 1.0 + len(w) * w + 1e-9), (n, counts, n * w)
        if n >= 100 * (1 + len(w)):
            assert np.all(np.abs(counts / n - w) <= 0.01)
    # each dataset's samples are taken in order 0, 1, 2, ...
    for k in range(len(w)):
        assert sample_index[ds_index == k].tolist() == list(range(int(counts[k])))


def _dataset(path, value, n_docs, length):
    with IndexedDatasetBuilder(str(path), dtype=np.uint16) as b:
        for _ in range(n_docs):
            b.add_document(np.full(length, value))
    return str(path)


def test_blended_train_set_realises_weights(tmp_path):
    # dataset A holds only token 1, B only token 2: a sample says where it came from
    a = _dataset(tmp_path / "a", 1, 50, 40)
    b = _dataset(tmp_path / "b", 2, 20, 100)
    n = 3000
    train, valid, test = build_train_valid_test_datasets(
        ["0.7", a, "0.3", b], "90,10,0", 32, (n, 50, 0), seed=2, cache_dir=str(tmp_path / "c"))
    assert test is None and len(train) == n and len(valid) == 50
    src = np.array([int(train[i]["text"][0]) for i in range(n)])
    assert all(len(set(train[i]["text"].tolist())) == 1 for i in range(0, n, 97))
    share_a = float(np.mean(src == 1))
    assert abs(share_a - 0.7) <= 0.01 and abs(float(np.mean(src == 2)) - 0.3) <= 0.01
    # the first 1000 are balanced too, not only the whole
    assert abs(float(np.mean(src[:1000] == 1)) - 0.7) <= 0.01
    # weights omitted: proportional to the tokens of each train split (45*40 vs 18*100)
    tr, _, _ = build_train_valid_test_datasets([a, b], "90,10,0", 32, (1000, 0, 0), seed=2,
                                               cache_dir=str(tmp_path / "c"))
    src = np.array([int(tr[i]["text"][0]) for i in range(1000)])
    assert abs(float(np.mean(src == 1)) - 1800 / 3600) <= 0.01
