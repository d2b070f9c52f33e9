"""data/batch_check.py and the datasets' locate(): a bad id is found by a plain numpy scan's answer, and its
file and document are the ones an id-encoding corpus says (each token is ``1000 * document + offset``)."""

import numpy as np
import pytest
import torch

from megatron_tokenformer.data.batch_check import TokenIdError, describe, out_of_vocab
from megatron_tokenformer.data.blending import BlendedDataset
from megatron_tokenformer.data.gpt_dataset import GPTDataset
from megatron_tokenformer.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, IndexedDatasetError


def _first_bad_reference(a, vocab):
    bad = np.argwhere((a < 0) | (a >= vocab))
    return None if bad.size == 0 else (int(bad[0][0]), int(bad[0][1]), int(a[bad[0][0], bad[0][1]]))


@pytest.mark.parametrize("as_tensor", [False, True], ids=["numpy", "torch"])
def test_out_of_vocab_finds_the_first_bad_id(as_tensor):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 50, (4, 17)).astype(np.int64)
    conv = torch.from_numpy if as_tensor else (lambda x: x)
    assert out_of_vocab(conv(a.copy()), 50) is None
    for (r, c, v) in [(2, 5, 50), (0, 16, 10 ** 6), (3, 0, -1)]:
        b = a.copy()
        b[r, c] = v
        b[3, 16] = 77  # a later bad id: the first in row-major order is reported
        assert out_of_vocab(conv(b), 50) == _first_bad_reference(b, 50)
    assert out_of_vocab(conv(np.zeros((0, 5), np.int64)), 50) is None
    assert TokenIdError.__mro__[1] is IndexedDatasetError


def _encoded_corpus(path, lengths):
    """Document d holds 1000 * d + offset at each offset (int32): every id tells where it came from."""
    with IndexedDatasetBuilder(str(path), dtype=np.int32) as b:
        for d, n in enumerate(lengths):
            b.add_document(1000 * d + np.arange(n))
    return IndexedDataset(str(path))


def test_gpt_dataset_locates_every_token(tmp_path):
    lengths = [7, 0, 3, 12, 1, 9, 5]  # an empty document and samples crossing several documents
    data = _encoded_corpus(tmp_path / "enc", lengths)
    ds = GPTDataset(data, "train", (0, len(lengths)), 9, 4, seed=3, cache_dir=str(tmp_path / "cache"))
    for i in range(len(ds)):
        item = ds[i]
        assert item["index"] == i
        for pos, token in enumerate(item["text"].tolist()):
            path, document, offset = ds.locate(i, pos)
            assert (path, document, offset) == (data.bin_path, token // 1000, token % 1000)
    with pytest.raises(IndexError):
        ds.locate(len(ds), 0)


def test_blended_dataset_locates_in_its_member(tmp_path):
    a = _encoded_corpus(tmp_path / "a", [5, 6, 7])
    b = _encoded_corpus(tmp_path / "b", [4, 8])
    da = GPTDataset(a, "train", (0, 3), 6, 3, seed=1, cache_dir=str(tmp_path / "cache"))
    db = GPTDataset(b, "train", (0, 2), 6, 3, seed=1, cache_dir=str(tmp_path / "cache"))
    blend = BlendedDataset([da, db], [0.5, 0.5], 10)
    for i in range(len(blend)):
        item = blend[i]
        assert item["index"] == i
        member = [a, b][int(blend.dataset_index[i])]
        for pos, token in enumerate(item["text"].tolist()):
            assert blend.locate(i, pos) == (member.bin_path, token // 1000, token % 1000)


def test_describe_names_file_and_document(tmp_path):
    data = _encoded_corpus(tmp_path / "enc", [6, 6, 6])
    ds = GPTDataset(data, "train", (0, 3), 4, 4, seed=0, cache_dir=str(tmp_path / "cache"))
    token = int(ds[2]["text"][3])
    line = describe(ds, 2, 3, 5000, 100, "a training batch on rank 1")
    assert line.startswith(f"{data.bin_path}: document {token // 1000} holds token id 5000 (its token "
                           f"{token % 1000}), which does not fit the model's vocabulary of 100 (found in a "
                           "training batch on rank 1; ")
    assert "\n" not in line
    # a dataset that cannot locate (mock data) still gives one line with the sample and position
    assert describe(object(), 7, 2, -3, 100, "x").startswith("token id -3 does not fit the model's vocabulary of 100 "
                                                             "(found in x, sample 7, position 2;")
