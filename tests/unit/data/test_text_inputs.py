"""data/text_inputs.py: which files are read, how they are cut into chunks and documents, and the
one-line errors for bad input (the expected documents are written out by hand)."""

import json

import pytest

from megatron_tokenformer.data.text_inputs import (
    BadInputError,
    expand_inputs,
    file_format,
    iter_chunks,
    iter_documents,
    parse_chunk,
)

TEXT = "first doc\nline two\n\n\n  \nsecond doc\n\t\nthird\n"
TEXT_DOCS = ["first doc\nline two", "second doc", "third"]


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(path)


def test_expand_inputs_files_folders_globs(tmp_path):
    a = write(tmp_path / "a.txt", "x")
    b = write(tmp_path / "sub" / "b.jsonl", "{}")
    write(tmp_path / "sub" / ".hidden.txt", "x")
    write(tmp_path / "sub" / "image.png", "x")
    c = write(tmp_path / "sub" / "deeper" / "c.md", "x")
    assert expand_inputs([str(tmp_path)]) == [a, b, c], "recursive, sorted, known suffixes, no dot files"
    assert expand_inputs(str(tmp_path / "sub" / "*.jsonl")) == [b]
    assert expand_inputs([b, a]) == [b, a], "named files keep their order"


@pytest.mark.parametrize("spec,match", [
    ("missing.txt", r"^--input .*missing.txt: no such file or folder$"),
    ("*.nothing", r"^--input .*\*.nothing: the pattern matches no file$"),
    ("empty_dir", r"^--input .*empty_dir: folder holds no text or JSON-lines files"),
])
def test_expand_inputs_errors_name_the_flag(tmp_path, spec, match):
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(BadInputError, match=match):
        expand_inputs([str(tmp_path / spec)])
    with pytest.raises(BadInputError, match=r"^--data: no input files given$"):
        expand_inputs([], flag="--data")


def test_file_format():
    assert [file_format(p) for p in ("a.jsonl", "a.json", "a.ndjson", "a.txt", "a")] == \
        ["jsonl", "jsonl", "jsonl", "text", "text"]
    assert file_format("a.jsonl", "text") == "text"
    with pytest.raises(BadInputError, match=r"--input-format must be auto, jsonl or text, got 'csv'"):
        file_format("a.txt", "csv")


def test_blank_line_documents(tmp_path):
    path = write(tmp_path / "a.txt", TEXT)
    assert list(iter_documents([path])) == TEXT_DOCS


def test_bom_and_crlf(tmp_path):
    path = write(tmp_path / "a.txt", b"\xef\xbb\xbf" + TEXT.replace("\n", "\r\n").encode())
    docs = list(iter_documents([path]))
    assert [d.replace("\r", "") for d in docs] == TEXT_DOCS and not docs[0].startswith("\ufeff")


def test_file_boundary_keeps_whole_files(tmp_path):
    a = write(tmp_path / "a.txt", TEXT)
    b = write(tmp_path / "b.txt", " \n\n")
    report = {}
    assert list(iter_documents([a, b], boundary="file", report=report)) == [TEXT]
    assert report["documents"] == 1
    with pytest.raises(BadInputError, match="--document-boundary must be one of blank-line, file"):
        list(iter_documents([a], boundary="page"))


def test_jsonl_keys(tmp_path):
    lines = [{"text": "one", "title": "T1"}, {"text": "two", "title": ""}, {"text": "three", "title": "T3"}]
    path = write(tmp_path / "a.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    assert list(iter_documents([path])) == ["one", "two", "three"]
    assert list(iter_documents([path], json_keys=("text", "title"))) == ["one", "two", "three", "T1", "T3"]


@pytest.mark.parametrize("chunk_bytes", [7, 64, 1 << 20])
def test_chunking_does_not_change_documents(tmp_path, chunk_bytes):
    text_docs = [f"doc {i}\n" + "word " * (i % 5) for i in range(40)]
    text = write(tmp_path / "a.txt", "\n\n".join(text_docs) + "\n")
    jsonl = write(tmp_path / "b.jsonl", "".join(json.dumps({"text": f"j{i}"}) + "\n" for i in range(30)))
    got = [d for chunk in iter_chunks([text, jsonl], chunk_bytes=chunk_bytes) for d in parse_chunk(chunk).docs["text"]]
    assert got == [d.rstrip("\n") for d in text_docs] + [f"j{i}" for i in range(30)]
    first_lines = [chunk.items[0][0] for chunk in iter_chunks([jsonl], chunk_bytes=chunk_bytes)]
    assert first_lines[0] == 1 and first_lines == sorted(set(first_lines)), "line numbers follow the chunks"


@pytest.mark.parametrize("content,match", [
    ('{"text": "ok"}\n{"text": oops}\n', r"a.jsonl:2: not valid JSON \(Expecting value at column 10\)"),
    ('{"text": "ok"}\n\n[1, 2]\n', r"a.jsonl:3: a JSON line must be an object, got list"),
    ('{"body": "ok"}\n', r"a.jsonl:1: the JSON object has no key 'text' \(see --json-keys\)"),
    ('{"text": 5}\n', r"a.jsonl:1: the value of 'text' is a int, not a string"),
    (b'{"text": "ok"}\n{"text": "\xff"}\n', r"a.jsonl:2: not valid UTF-8 \(byte 0xff at column 11\)"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, content, match):
    path = write(tmp_path / "a.jsonl", content)
    with pytest.raises(BadInputError, match=match):
        list(iter_documents([path]))
    report = {}
    docs = list(iter_documents([path], skip_bad_lines=True, report=report))
    assert len(report["bad_lines"]) == 1 and report["documents"] == len(docs)
    assert docs == (["ok"] if "ok" in str(content) and '"body"' not in str(content) else [])


def test_bad_utf8_text_line(tmp_path):
    path = write(tmp_path / "a.txt", b"good\n\nbad \xc3\x28 line\nmore\n\nlast\n")
    with pytest.raises(BadInputError, match=r"a.txt:3: not valid UTF-8 \(byte 0xc3 at column 5\)"):
        list(iter_documents([path]))
    report = {}
    assert list(iter_documents([path], skip_bad_lines=True, report=report)) == ["good", "more", "last"]
    assert len(report["bad_lines"]) == 1
