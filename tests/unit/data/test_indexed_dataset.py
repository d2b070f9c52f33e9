"""MMIDIDX .bin/.idx: written by the builder, read by an independent reader written here from
the format's description (and the other way round); corrupt pairs fail when opened."""

import json
import os
import struct

import numpy as np
import pytest

from megatron_tokenformer.data.indexed_dataset import (
    IndexedDataset,
    IndexedDatasetBuilder,
    IndexedDatasetError,
    best_fitting_dtype,
    merge_datasets,
)

# The format, from Megatron-LM's description: magic, <Q version, <B dtype code, <Q number of
# sequences, <Q number of document-index entries, int32 lengths, int64 byte pointers,
# int64 document index.
CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
         7: np.float32, 8: np.uint16}


def independent_read(prefix):
    with open(prefix + ".idx", "rb") as f:
        raw = f.read()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, = struct.unpack_from("<Q", raw, 9)
    code, = struct.unpack_from("<B", raw, 17)
    n_seq, n_doc = struct.unpack_from("<QQ", raw, 18)
    off = 34
    lengths = np.frombuffer(raw, "<i4", n_seq, off)
    off += 4 * n_seq
    pointers = np.frombuffer(raw, "<i8", n_seq, off)
    off += 8 * n_seq
    docs = np.frombuffer(raw, "<i8", n_doc, off)
    off += 8 * n_doc
    assert off == len(raw)
    dtype = np.dtype(CODES[code]).newbyteorder("<")
    data = open(prefix + ".bin", "rb").read()
    seqs = [np.frombuffer(data, dtype, int(n), int(p)) for n, p in zip(lengths, pointers)]
    return dict(version=version, code=code, lengths=lengths, pointers=pointers, docs=docs,
                seqs=seqs, bin_size=len(data))


def independent_write(prefix, documents, code):
    """Write a pair by hand; ``documents`` is a list of lists of sequences."""
    dtype = np.dtype(CODES[code])
    lengths, pointers, doc_index, pos = [], [], [0], 0
    with open(prefix + ".bin", "wb") as f:
        for doc in documents:
            for seq in doc:
                a = np.asarray(seq, dtype=dtype)
                f.write(a.tobytes())
                lengths.append(a.size)
                pointers.append(pos)
                pos += a.nbytes
            doc_index.append(len(lengths))
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code))
        f.write(struct.pack("<QQ", len(lengths), len(doc_index)))
        f.write(np.asarray(lengths, "<i4").tobytes())
        f.write(np.asarray(pointers, "<i8").tobytes())
        f.write(np.asarray(doc_index, "<i8").tobytes())


def random_docs(rng, n, high, max_len=40):
    return [rng.integers(0, high, rng.integers(0, max_len)) for _ in range(n)]


@pytest.mark.parametrize("vocab,code", [(500, 8), (70000, 4)])
def test_builder_output_read_by_independent_reader(tmp_path, vocab, code):
    rng = np.random.default_rng(0)
    docs = random_docs(rng, 50, vocab)
    dtype = best_fitting_dtype(vocab)
    prefix = str(tmp_path / "d")
    with IndexedDatasetBuilder(prefix, dtype=dtype) as b:
        for d in docs[:20]:
            b.add_document(d)
        lengths = np.array([len(d) for d in docs[20:]])
        b.add_documents(np.concatenate(docs[20:]), lengths)
    r = independent_read(prefix)
    assert r["version"] == 1 and r["code"] == code
    assert r["docs"].tolist() == list(range(51))
    assert r["lengths"].tolist() == [len(d) for d in docs]
    itemsize = np.dtype(CODES[code]).itemsize
    assert r["pointers"].tolist() == (np.cumsum([0] + [len(d) for d in docs[:-1]]) * itemsize).tolist()
    for got, want in zip(r["seqs"], docs):
        assert got.tolist() == want.tolist()
    # our reader agrees, with zero-copy views
    ds = IndexedDataset(prefix)
    assert len(ds) == 50 and ds.num_documents == 50 and ds.dtype == np.dtype(CODES[code])
    for i, want in enumerate(docs):
        assert ds[i].tolist() == want.tolist()
    nonempty = next(i for i, d in enumerate(docs) if len(d))
    assert not ds[nonempty].flags.owndata and np.shares_memory(ds[nonempty], ds.tokens)
    assert ds.get(nonempty, 1, 2).tolist() == docs[nonempty][1:3].tolist()
    assert [a.tolist() for a in ds[3:6]] == [d.tolist() for d in docs[3:6]]
    assert ds[-1].tolist() == docs[-1].tolist()
    assert ds.sizes.tolist() == r["lengths"].tolist() and ds.doc_idx.tolist() == r["docs"].tolist()
    with pytest.raises(IndexError):
        ds[50]
    assert ds.max_token_id() == max(int(d.max()) for d in docs if len(d))


def test_multi_sequence_documents_and_hand_written_files(tmp_path):
    """A pair written by hand from the spec (several sequences per document, as Megatron's
    --split-sentences produces) is read correctly."""
    rng = np.random.default_rng(1)
    documents = [[rng.integers(0, 250, rng.integers(1, 9)) for _ in range(rng.integers(1, 4))]
                 for _ in range(12)]
    prefix = str(tmp_path / "hand")
    independent_write(prefix, documents, code=1)
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.uint8
    assert ds.num_documents == 12 and len(ds) == sum(len(d) for d in documents)
    flat = [s for d in documents for s in d]
    for i, s in enumerate(flat):
        assert ds[i].tolist() == s.tolist()
    for k, d in enumerate(documents):
        assert ds.get_document(k).tolist() == np.concatenate(d).tolist()
    # the builder produces byte-identical files from the same content
    prefix2 = str(tmp_path / "built")
    with IndexedDatasetBuilder(prefix2, dtype=np.uint8) as b:
        for d in documents:
            for s in d:
                b.add_item(s)
            b.end_document()
    for ext in (".bin", ".idx"):
        assert open(prefix + ext, "rb").read() == open(prefix2 + ext, "rb").read()


def _make(tmp_path, name, docs, dtype=np.uint16):
    prefix = str(tmp_path / name)
    with IndexedDatasetBuilder(prefix, dtype=dtype) as b:
        for d in docs:
            b.add_document(d)
    return prefix


def test_corrupt_pairs_fail_when_opened(tmp_path):
    rng = np.random.default_rng(2)
    good = _make(tmp_path, "good", random_docs(rng, 10, 300, 30) + [np.arange(5)])
    other = _make(tmp_path, "other", random_docs(rng, 7, 300, 30) + [np.arange(5)])
    idx, bin_ = open(good + ".idx", "rb").read(), open(good + ".bin", "rb").read()

    def case(name, idx_bytes, bin_bytes, match):
        p = str(tmp_path / name)
        if idx_bytes is not None:
            open(p + ".idx", "wb").write(idx_bytes)
        if bin_bytes is not None:
            open(p + ".bin", "wb").write(bin_bytes)
        with pytest.raises(IndexedDatasetError, match=match) as e:
            IndexedDataset(p)
        assert name in str(e.value)

    case("trunc_bin", idx, bin_[:-2], r"trunc_bin\.bin.*truncated")
    case("long_bin", idx, bin_ + b"\0\0", r"long_bin\.bin.*longer")
    case("trunc_idx", idx[:-8], bin_, r"trunc_idx\.idx.*truncated")
    case("short_idx", idx[:20], bin_, r"short_idx\.idx.*truncated")
    case("bad_magic", b"NOTANIDX!" + idx[9:], bin_, r"bad_magic\.idx.*not an MMIDIDX")
    case("bad_version", idx[:9] + struct.pack("<Q", 2) + idx[17:], bin_, r"bad_version\.idx.*version 2")
    case("bad_dtype", idx[:17] + bytes([9]) + idx[18:], bin_, r"bad_dtype\.idx.*dtype code 9")
    case("mismatch", open(other + ".idx", "rb").read(), bin_, r"mismatch\.bin.*do(es)? not belong")
    case("no_bin", idx, None, r"no_bin\.bin.*not found")
    # document index that does not end at the sequence count
    bad_docs = bytearray(idx)
    bad_docs[-8:] = struct.pack("<q", 3)
    case("bad_docidx", bytes(bad_docs), bin_, r"bad_docidx\.idx.*document index")
    # pointers inconsistent with lengths
    n = 11
    bad_ptr = bytearray(idx)
    struct.pack_into("<q", bad_ptr, 34 + 4 * n + 8, 999)
    case("bad_ptr", bytes(bad_ptr), bin_, r"bad_ptr\.idx.*pointers")


def test_check_vocab_names_file_and_max_id(tmp_path):
    prefix = _make(tmp_path, "v", [np.array([1, 2, 3]), np.array([7, 41, 5])])
    ds = IndexedDataset(prefix)
    ds.check_vocab(42)
    with pytest.raises(IndexedDatasetError, match=r"v\.bin: token id 41 .* vocabulary of 41"):
        ds.check_vocab(41)
    # without the sidecar the maximum is computed from the .bin
    os.remove(prefix + ".meta.json")
    ds2 = IndexedDataset(prefix)
    assert ds2.max_token_id() == 41
    with pytest.raises(IndexedDatasetError, match="token id 41"):
        ds2.check_vocab(10)
    # a stale sidecar (other counts) is ignored
    json.dump({"num_tokens": 999, "num_sequences": 2, "dtype": "uint16", "max_token_id": 0},
              open(prefix + ".meta.json", "w"))
    assert IndexedDataset(prefix).max_token_id() == 41


def test_failed_build_leaves_nothing(tmp_path):
    prefix = str(tmp_path / "x")
    with pytest.raises(RuntimeError):
        with IndexedDatasetBuilder(prefix, dtype=np.uint16) as b:
            b.add_document(np.arange(10))
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="does not fit uint16"):
        with IndexedDatasetBuilder(prefix, dtype=np.uint16) as b:
            b.add_document(np.array([70000]))
    assert os.listdir(tmp_path) == []


def test_merge_concatenates_and_promotes_dtype(tmp_path):
    rng = np.random.default_rng(3)
    a_docs, b_docs = random_docs(rng, 9, 300), random_docs(rng, 5, 70000)
    a = _make(tmp_path, "a", a_docs, np.uint16)
    b = _make(tmp_path, "b", b_docs, np.int32)
    merged = merge_datasets([a, b, a], str(tmp_path / "m"))
    r = independent_read(str(tmp_path / "m"))
    assert r["code"] == 4  # int32 (the wider)
    want = a_docs + b_docs + a_docs
    assert [s.tolist() for s in r["seqs"]] == [d.tolist() for d in want]
    assert r["docs"].tolist() == list(range(len(want) + 1))
    assert merged.max_token_id() == max(int(d.max()) for d in want if len(d))
    with pytest.raises(ValueError, match="also an input"):
        merge_datasets([a], a)
