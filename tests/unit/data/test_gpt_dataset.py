"""GPT packed samples: content against a stream built here, splits by documents, the cached
index identical across builds and across concurrently building processes."""

import multiprocessing as mp
import os

import numpy as np
import pytest

from megatron_tokenformer.data.gpt_dataset import (
    GPTDataset,
    MockGPTDataset,
    build_train_valid_test_datasets,
    split_document_ranges,
)
from megatron_tokenformer.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, IndexedDatasetError


def make_data(path, n_docs=40, seed=0, vocab=300, max_len=30):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, vocab, rng.integers(1, max_len)) for _ in range(n_docs)]
    docs[3] = np.zeros(0, dtype=np.int64)  # an empty document must not break packing
    with IndexedDatasetBuilder(str(path), dtype=np.uint16) as b:
        for d in docs:
            b.add_document(d)
    return str(path), docs


def test_split_ranges_follow_megatrons_rounding():
    # 969,30,1 of 1000 documents
    assert split_document_ranges("969,30,1", 1000) == [(0, 969), (969, 999), (999, 1000)]
    # each split gets round(fraction * n) documents; the rounding error (here 9 - 10) is
    # taken out of the train split, as Megatron does: boundaries 0, 3+1, 6+1, 9+1
    assert split_document_ranges("1,1,1", 10) == [(0, 4), (4, 7), (7, 10)]
    assert split_document_ranges("98,2", 5) == [(0, 5), (5, 5), (5, 5)]
    assert split_document_ranges("100,0,0", 7) == [(0, 7), (7, 7), (7, 7)]
    with pytest.raises(ValueError, match="--split"):
        split_document_ranges("a,b", 10)
    with pytest.raises(ValueError, match="--split"):
        split_document_ranges("0,0,0", 10)


def test_samples_are_the_shuffled_document_stream(tmp_path):
    prefix, docs = make_data(tmp_path / "d")
    seq = 16
    train, valid, test = build_train_valid_test_datasets(
        [prefix], "80,10,10", seq, (100, 10, 3), seed=5, cache_dir=str(tmp_path / "cache"))
    assert (train.document_range, valid.document_range, test.document_range) == ((0, 32), (32, 36), (36, 40))
    for ds, (b, e), n_req in ((train, (0, 32), 100), (valid, (32, 36), 10), (test, (36, 40), 3)):
        split_docs = list(range(b, e))
        tokens_per_epoch = sum(len(docs[d]) for d in split_docs)
        doc_idx = np.asarray(ds.doc_idx)
        epochs = len(doc_idx) // len(split_docs)
        assert epochs * tokens_per_epoch - 1 >= n_req * seq  # enough for the request
        assert (epochs - 1) * tokens_per_epoch - 1 < n_req * seq  # and not one epoch more
        for ep in range(epochs):  # each epoch visits every split document once
            assert sorted(doc_idx[ep * len(split_docs):(ep + 1) * len(split_docs)]) == split_docs
        # reference stream, from the documents kept in this test
        stream = np.concatenate([docs[d] for d in doc_idx])
        n_samples = (len(stream) - 1) // seq
        assert len(ds) == n_samples >= n_req
        served = set()
        for i in range(len(ds)):
            s = int(ds.shuffle_idx[i])
            served.add(s)
            item = ds[i]["text"]
            assert item.dtype == np.int64 and item.shape == (seq + 1,)
            assert np.array_equal(item, stream[s * seq:s * seq + seq + 1])
        assert served == set(range(n_samples))  # a permutation
    # the samples of the first E-1 epochs are served before those of the last epoch
    tpe = sum(len(docs[d]) for d in range(32))
    epochs = len(train.doc_idx) // 32
    assert epochs > 1
    first = ((epochs - 1) * tpe - 1) // seq
    assert set(np.asarray(train.shuffle_idx[:first]).tolist()) == set(range(first))


def test_samples_spanning_many_short_documents(tmp_path):
    """Samples made of many (> 8) document pieces take the vectorised gather path."""
    prefix, docs = make_data(tmp_path / "s", n_docs=300, max_len=4)
    seq = 64
    ds = GPTDataset(IndexedDataset(prefix), "train", (0, 300), 50, seq, seed=9)
    stream = np.concatenate([docs[d] for d in np.asarray(ds.doc_idx)])
    pieces = np.diff(np.asarray(ds.sample_idx)[:, 0])
    assert pieces.min() > 8  # every sample takes the gather path
    for i in range(len(ds)):
        s = int(ds.shuffle_idx[i])
        assert np.array_equal(ds[i]["text"], stream[s * seq:s * seq + seq + 1])


def test_pickles_by_path(tmp_path):
    """DataLoader workers started with spawn receive the dataset by pickle: only paths travel."""
    import pickle

    from megatron_tokenformer.data.blending import BlendedDataset

    prefix, _ = make_data(tmp_path / "d", n_docs=400, max_len=60)
    ds = GPTDataset(IndexedDataset(prefix), "train", (0, 400), 100, 16, seed=2)
    blob = pickle.dumps(BlendedDataset([ds, ds], [0.5, 0.5], 50))
    assert len(blob) < 8000 < ds.indexed_dataset.num_tokens * 2  # not the token data
    back = pickle.loads(blob)
    for i in range(50):
        assert np.array_equal(back[i]["text"], ds[int(back.dataset_sample_index[i])]["text"])


def test_cache_is_reused_and_identical(tmp_path):
    prefix, _ = make_data(tmp_path / "d", n_docs=30)
    ds1 = GPTDataset(IndexedDataset(prefix), "train", (0, 25), 40, 8, seed=3)
    assert ds1.built_cache
    cache_dir = os.path.join(str(tmp_path), "index-cache")  # default: next to the data
    assert sorted(os.listdir(cache_dir))[0].startswith("d-train-")
    ds2 = GPTDataset(IndexedDataset(prefix), "train", (0, 25), 40, 8, seed=3)
    assert not ds2.built_cache
    for a, b in ((ds1.doc_idx, ds2.doc_idx), (ds1.sample_idx, ds2.sample_idx), (ds1.shuffle_idx, ds2.shuffle_idx)):
        assert np.array_equal(a, b)
    # rebuilding from scratch gives byte-identical files
    files = {n: open(os.path.join(cache_dir, n), "rb").read() for n in os.listdir(cache_dir) if n.endswith(".npy")}
    for n in files:
        os.remove(os.path.join(cache_dir, n))
    ds3 = GPTDataset(IndexedDataset(prefix), "train", (0, 25), 40, 8, seed=3)
    assert ds3.built_cache
    assert files == {n: open(os.path.join(cache_dir, n), "rb").read() for n in files}
    # another seed is another order, in other files
    ds4 = GPTDataset(IndexedDataset(prefix), "train", (0, 25), 40, 8, seed=4)
    assert ds4.cache_paths["shuffle_idx"] != ds1.cache_paths["shuffle_idx"]
    assert not np.array_equal(ds4.shuffle_idx, ds1.shuffle_idx)


def test_read_only_cache(tmp_path, monkeypatch):
    """A cache built once is loaded without taking the lock (works on a read-only folder);
    when the lock cannot be created, building fails with one clear error."""
    import megatron_tokenformer.data.gpt_dataset as gd

    prefix, _ = make_data(tmp_path / "d", n_docs=30)
    cache = str(tmp_path / "ro")
    ds1 = GPTDataset(IndexedDataset(prefix), "train", (0, 25), 40, 8, seed=3, cache_dir=cache)

    def refuse(self):
        raise PermissionError(13, "Read-only file system", self.path)

    monkeypatch.setattr(gd._FileLock, "acquire", refuse)
    ds2 = GPTDataset(IndexedDataset(prefix), "train", (0, 25), 40, 8, seed=3, cache_dir=cache)
    assert not ds2.built_cache and np.array_equal(ds1.shuffle_idx, ds2.shuffle_idx)
    with pytest.raises(IndexedDatasetError,
                       match=r"cannot build the sample index in .*ro .*writable --data-cache-path"):
        GPTDataset(IndexedDataset(prefix), "train", (0, 25), 40, 8, seed=4, cache_dir=cache)
    # a cache folder that cannot be created
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(IndexedDatasetError, match="cannot create the dataset index cache folder"):
        GPTDataset(IndexedDataset(prefix), "train", (0, 25), 40, 8, seed=3, cache_dir=str(blocker / "sub"))


def _build_in_process(prefix, cache_dir, barrier, queue):
    barrier.wait()  # start together: both race to build the same cache
    ds = GPTDataset(IndexedDataset(prefix), "train", (0, 200), 3000, 32, seed=11, cache_dir=cache_dir)
    queue.put((os.getpid(), ds.built_cache,
               [np.asarray(a).tobytes() for a in (ds.doc_idx, ds.sample_idx, ds.shuffle_idx)],
               [ds[i]["text"].tolist() for i in (0, 1, len(ds) - 1)]))


def test_concurrent_builders_agree(tmp_path):
    """Two spawned processes (as two ranks) build the same index at the same time: the file
    lock lets one build, the other loads; both see identical arrays and samples."""
    prefix, _ = make_data(tmp_path / "d", n_docs=200, max_len=60)
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_build_in_process, args=(prefix, str(tmp_path / "c"), barrier, queue))
             for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted(r[1] for r in results) == [False, True]  # exactly one built it
    assert results[0][2] == results[1][2] and results[0][3] == results[1][3]
    assert not [n for n in os.listdir(tmp_path / "c") if ".tmp-" in n]


def test_empty_train_split_and_vocab_check(tmp_path):
    prefix, docs = make_data(tmp_path / "d", n_docs=10)
    with pytest.raises(IndexedDatasetError, match=r"--split 0,50,50 leaves the train set empty .*d"):
        build_train_valid_test_datasets([prefix], "0,50,50", 8, (10, 1, 1), 1)
    # 1 of 10 documents rounds to no train document
    with pytest.raises(IndexedDatasetError, match=r"d: --split 1,99,0 leaves the train set empty"):
        build_train_valid_test_datasets([prefix], "1,99,0", 8, (10, 1, 1), 1)
    train, valid, test = build_train_valid_test_datasets([prefix], "100,0,0", 8, (10, 5, 5), 1)
    assert valid is None and test is None and len(train) >= 10
    mx = max(int(d.max()) for d in docs if len(d))
    train.check_vocab(mx + 1)
    with pytest.raises(IndexedDatasetError, match=rf"d\.bin: token id {mx} does not fit .* {mx}"):
        train.check_vocab(mx)
    with pytest.raises(IndexedDatasetError, match=rf"token id {mx}"):
        build_train_valid_test_datasets([prefix], "100,0,0", 8, (10, 0, 0), 1, vocab_size=mx)


def test_mock_dataset():
    a = MockGPTDataset(20, 16, 50, seed=1)
    b = MockGPTDataset(20, 16, 50, seed=1)
    assert len(a) == 20
    for i in range(20):
        x = a[i]["text"]
        assert x.shape == (17,) and x.dtype == np.int64 and 0 <= x.min() and x.max() < 50
        assert np.array_equal(x, b[i]["text"])
    assert not np.array_equal(a[0]["text"], MockGPTDataset(20, 16, 50, seed=2)[0]["text"])
