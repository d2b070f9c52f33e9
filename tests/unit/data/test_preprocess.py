"""Raw text -> .bin/.idx: exact round trip, worker/chunking invariance, bad input."""

import os

import numpy as np
import pytest

from megatron_tokenformer.data.indexed_dataset import IndexedDataset
from megatron_tokenformer.data.preprocess import preprocess
from megatron_tokenformer.data.text_inputs import BadInputError
from megatron_tokenformer.data.tokenizer import SentencePieceTokenizer, TokenizerError
from tests.helpers.corpus_gen import make_documents, write_blank_line_text, write_jsonl


def quiet(msg):
    pass


def detok_all(prefix, tok, append_eod):
    ds = IndexedDataset(prefix)
    out = []
    for d in range(ds.num_documents):
        ids = ds.get_document(d)
        if append_eod:
            assert ids[-1] == tok.eod and tok.eod not in ids[:-1].tolist()
            ids = ids[:-1]
        out.append(tok.detokenize(ids))
    return out


def test_round_trip_blank_line_text(tmp_path, sp_model):
    """Every document detokenizes to its input text exactly: the tokenizer uses identity
    normalisation and byte fallback, so there is no sentencepiece normalisation to allow
    for. In blank-line mode a document is a block of non-blank lines joined by '\\n'."""
    docs = make_documents(150, seed=1)
    src = tmp_path / "c.txt"
    # separators of one and of several blank lines, one of them whitespace-only
    with open(src, "w", encoding="utf-8") as f:
        f.write("\n\n")
        for i, d in enumerate(docs):
            f.write(d + "\n" + ["\n", "\n\n", " \t\n"][i % 3])
    stats = preprocess([str(src)], str(tmp_path / "out"), tokenizer_model=sp_model, append_eod=True,
                       workers=2, chunk_bytes=700, log=quiet)
    tok = SentencePieceTokenizer(sp_model)
    assert detok_all(str(tmp_path / "out_text_document"), tok, True) == docs
    assert stats["documents"] == len(docs)
    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    assert ds.dtype == np.uint16 and ds.max_token_id() < tok.vocab_size


def test_round_trip_jsonl_multiple_keys_and_file_mode(tmp_path, sp_model):
    docs = make_documents(60, seed=2)
    titles = make_documents(60, seed=3, max_lines=1, max_words=4)
    src = tmp_path / "c.jsonl"
    write_jsonl(src, docs, extra=lambda i: {"title": titles[i], "id": i})
    preprocess([str(src)], str(tmp_path / "j"), tokenizer_model=sp_model, json_keys=["text", "title"],
               workers=1, log=quiet)
    tok = SentencePieceTokenizer(sp_model)
    assert detok_all(str(tmp_path / "j_text_document"), tok, False) == docs
    assert detok_all(str(tmp_path / "j_title_document"), tok, False) == titles

    # one document per file, a folder as input (files in sorted order), text kept verbatim
    folder = tmp_path / "files"
    folder.mkdir()
    file_docs = [d + "\n\n  trailing blank lines stay\n\n" for d in docs[:7]]
    for i, d in enumerate(file_docs):
        (folder / f"doc{i:02d}.txt").write_text(d, encoding="utf-8")
    preprocess([str(folder)], str(tmp_path / "f"), tokenizer_model=sp_model,
               document_boundary="file", workers=2, chunk_bytes=100, log=quiet)
    assert detok_all(str(tmp_path / "f_text_document"), tok, False) == file_docs


def test_output_independent_of_workers_and_chunking(tmp_path, sp_model):
    docs = make_documents(200, seed=4)
    src = tmp_path / "c.jsonl"
    write_jsonl(src, docs)
    outs = []
    for i, (workers, chunk) in enumerate([(1, 1 << 20), (2, 300), (2, 1)]):
        p = str(tmp_path / f"o{i}")
        preprocess([str(src)], p, tokenizer_model=sp_model, append_eod=True, workers=workers,
                   chunk_bytes=chunk, log=quiet)
        outs.append([open(p + "_text_document" + e, "rb").read() for e in (".bin", ".idx")])
    assert outs[0] == outs[1] == outs[2]


def test_progress_line(tmp_path, sp_model):
    src = tmp_path / "c.jsonl"
    write_jsonl(src, make_documents(50, seed=5))
    lines = []
    preprocess([str(src)], str(tmp_path / "o"), tokenizer_model=sp_model, workers=1, log_interval=10,
               chunk_bytes=200, log=lines.append)
    progress = [l for l in lines if l.startswith("Processed")]
    assert progress, lines
    assert all("docs/s" in l and "tokens/s" in l and "MB/s" in l for l in progress)


def _no_outputs(tmp_path, stem):
    left = [n for n in os.listdir(tmp_path) if n.startswith(stem)]
    assert left == [], left


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("notobj.jsonl", '{"text": "fine"}\n[1, 2]\n', r"notobj\.jsonl:2: a JSON line must be an object, got list"),
        ("nokey.jsonl", '{"text": "a"}\n\n{"body": "b"}\n', r"nokey\.jsonl:3: the JSON object has no key 'text'"),
        ("badjson.jsonl", '{"text": "a"}\n{"text": "b"\n', r"badjson\.jsonl:2: not valid JSON"),
        ("notstr.jsonl", '{"text": 5}\n', r"notstr\.jsonl:1: the value of 'text' is a int"),
        ("utf8.jsonl", b'{"text": "a"}\n{"text": "\xff\xfe"}\n', r"utf8\.jsonl:2: not valid UTF-8 \(byte 0xff"),
        ("utf8.txt", b"good line\n\nbad \xc3\x28 line\nmore\n", r"utf8\.txt:3: not valid UTF-8"),
        ("empty.txt", "", r"empty input: no documents found in --input .*empty\.txt"),
        ("blank.txt", "\n \n\t\n", r"empty input: .*blank\.txt"),
        ("emptyobj.jsonl", '{"text": ""}\n', r"empty input: .*emptyobj\.jsonl"),
    ],
)
def test_bad_input_fails_naming_file_and_line(tmp_path, sp_model, name, content, match):
    src = tmp_path / name
    if isinstance(content, bytes):
        src.write_bytes(content)
    else:
        src.write_text(content)
    with pytest.raises(BadInputError, match=match):
        preprocess([str(src)], str(tmp_path / "out"), tokenizer_model=sp_model, workers=2,
                   chunk_bytes=8, log=quiet)
    _no_outputs(tmp_path, "out")


def test_skip_bad_lines_counts_and_reports(tmp_path, sp_model):
    src = tmp_path / "mixed.jsonl"
    src.write_bytes(b'{"text": "one"}\n[1]\n{"other": 1}\n{"text": "\xff"}\n{"text": "two"}\nnot json\n')
    lines = []
    stats = preprocess([str(src)], str(tmp_path / "out"), tokenizer_model=sp_model, workers=2,
                       chunk_bytes=10, skip_bad_lines=True, log=lines.append)
    assert stats["documents"] == 2
    assert [m.split(": ")[0] for m in stats["bad_lines"]] == [f"{src}:{i}" for i in (2, 3, 4, 6)]
    assert any("Skipped 4 bad lines" in l for l in lines)
    tok = SentencePieceTokenizer(sp_model)
    assert detok_all(str(tmp_path / "out_text_document"), tok, False) == ["one", "two"]


def test_bad_tokenizer_or_missing_input_writes_nothing(tmp_path, sp_model):
    src = tmp_path / "c.txt"
    write_blank_line_text(src, ["hello world"])
    junk = tmp_path / "junk.model"
    junk.write_text("not a model")
    with pytest.raises(TokenizerError, match=r"junk\.model: not a sentencepiece model"):
        preprocess([str(src)], str(tmp_path / "out"), tokenizer_model=str(junk), log=quiet)
    with pytest.raises(TokenizerError, match=r"nothere\.model: tokenizer model not found"):
        preprocess([str(src)], str(tmp_path / "out"), tokenizer_model=str(tmp_path / "nothere.model"),
                   log=quiet)
    with pytest.raises(BadInputError, match=r"c\.txt: plain text has no keys; several --json-keys"):
        preprocess([str(src)], str(tmp_path / "out"), tokenizer_model=sp_model, json_keys=["a", "b"],
                   log=quiet)
    with pytest.raises(BadInputError, match=r"--input .*missing\.txt: no such file"):
        preprocess([str(tmp_path / "missing.txt")], str(tmp_path / "out"), tokenizer_model=sp_model,
                   log=quiet)
    _no_outputs(tmp_path, "out")


def test_failure_keeps_previous_valid_output_untouched_or_removed(tmp_path, sp_model):
    """A failed run never leaves a new-looking pair: an existing good pair of the same name
    stays readable and unchanged when the failure happens before finalisation."""
    good = tmp_path / "good.jsonl"
    write_jsonl(good, ["first document", "second"])
    preprocess([str(good)], str(tmp_path / "out"), tokenizer_model=sp_model, log=quiet)
    before = open(tmp_path / "out_text_document.bin", "rb").read()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n' * 50 + "oops\n")
    with pytest.raises(BadInputError, match=r"bad\.jsonl:51"):
        preprocess([str(bad)], str(tmp_path / "out"), tokenizer_model=sp_model, chunk_bytes=64,
                   workers=2, log=quiet)
    assert open(tmp_path / "out_text_document.bin", "rb").read() == before
    assert IndexedDataset(str(tmp_path / "out_text_document")).num_documents == 2
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_utf8_bom_and_crlf(tmp_path, sp_model):
    src = tmp_path / "bom.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + b'{"text": "first"}\r\n{"text": "second"}\r\n')
    preprocess([str(src)], str(tmp_path / "o"), tokenizer_model=sp_model, log=quiet)
    tok = SentencePieceTokenizer(sp_model)
    assert detok_all(str(tmp_path / "o_text_document"), tok, False) == ["first", "second"]


def test_chunks_in_flight_are_bounded(tmp_path, sp_model, monkeypatch):
    """Flat memory: the reader never runs more than 2 * workers + 2 chunks ahead of the writer."""
    import megatron_tokenformer.data.preprocess as pp
    from megatron_tokenformer.data.indexed_dataset import IndexedDatasetBuilder

    src = tmp_path / "c.jsonl"
    write_jsonl(src, make_documents(400, seed=11))
    produced, lead = [0], []
    real_iter, real_add = pp.iter_chunks, IndexedDatasetBuilder.add_documents

    def counting_iter(*a, **k):
        for c in real_iter(*a, **k):
            produced[0] += 1
            yield c

    consumed = [0]

    def counting_add(self, tokens, lengths):
        consumed[0] += 1
        lead.append(produced[0] - consumed[0])
        return real_add(self, tokens, lengths)

    monkeypatch.setattr(pp, "iter_chunks", counting_iter)
    monkeypatch.setattr(IndexedDatasetBuilder, "add_documents", counting_add)
    preprocess([str(src)], str(tmp_path / "o"), tokenizer_model=sp_model, workers=2,
               chunk_bytes=200, log=quiet)
    assert produced[0] > 50 and consumed[0] == produced[0]
    assert max(lead) <= 2 * 2 + 2
