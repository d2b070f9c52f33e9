"""data/local_corpus.py on a small hand-made tree: which files are taken, in which order, the size
limit, both output formats, and the one-line errors (nothing half-written)."""

import json
import os

import pytest

from megatron_tokenformer.data.local_corpus import build_local_corpus, iter_corpus_files

BODY = "x = 1\n" * 40  # 240 bytes, above the 200-byte minimum


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "root"
    files = {
        "b.py": BODY, "a.md": "# title\n" + BODY, "small.txt": "too small",
        "pkg/c.rst": BODY + "\r\nend\r\n", "pkg/data.bin": BODY, "pkg/__pycache__/d.py": BODY,
        "tests/e.py": BODY, ".hidden/f.py": BODY, "pkg/blank.txt": "\n" * 300,
    }
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode())
    return str(root)


def test_candidate_files_sorted_and_filtered(tree):
    rel = [os.path.relpath(p, tree) for _, p in iter_corpus_files([tree, tree])]
    assert rel == ["a.md", "b.py", "pkg/blank.txt", "pkg/c.rst"], "sorted, known suffixes, >= 200 bytes, each once"


def test_jsonl_output(tree, tmp_path):
    out = str(tmp_path / "out" / "corpus.jsonl")
    stats = build_local_corpus(out, roots=[tree])
    with open(out) as f:
        records = [json.loads(line) for line in f]
    assert [r["source"] for r in records] == ["a.md", "b.py", os.path.join("pkg", "c.rst")], "blank files skipped"
    assert "\r" not in records[2]["text"]
    assert records[1]["text"] == BODY.strip("\n") and records[2]["text"].endswith("x = 1\n\nend")  # CRLF -> LF
    assert stats == {"documents": 3, "bytes": os.path.getsize(out), "output": out}
    assert os.listdir(os.path.dirname(out)) == ["corpus.jsonl"], "no temporary file left"


def test_text_output_and_size_limit(tree, tmp_path):
    out = str(tmp_path / "corpus.txt")
    one_doc = len(("# title\n" + BODY).strip("\n").encode()) + 2
    stats = build_local_corpus(out, max_mb=(one_doc + 10) / 1e6, roots=[tree])
    assert stats["documents"] == 1 and stats["bytes"] == one_doc
    with open(out) as f:
        assert f.read() == ("# title\n" + BODY).strip("\n") + "\n\n"


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_mb=0), r"--max-mb must be > 0, got 0"),
    (dict(fmt="csv"), r"--format must be jsonl or text, got 'csv'"),
    (dict(roots=["/no/such/folder"]), r"--roots /no/such/folder: no such folder"),
])
def test_bad_arguments(tmp_path, kwargs, match):
    out = tmp_path / "c.jsonl"
    with pytest.raises(ValueError, match=match):
        build_local_corpus(str(out), **kwargs)
    assert not out.exists()


def test_no_text_files_writes_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "o" / "c.jsonl"
    with pytest.raises(ValueError, match="no text files found under"):
        build_local_corpus(str(out), roots=[str(tmp_path / "empty")])
    assert os.listdir(out.parent) == []


def test_shuffle_seed_writes_the_same_files_in_a_seeded_order(tmp_path):
    import random

    root = tmp_path / "many"
    root.mkdir()
    for i in range(20):
        (root / f"m{i:02d}.py").write_text(f"# file {i}\n" + BODY)
    sorted_out, shuffled_out, again_out = (str(tmp_path / f"{n}.jsonl") for n in ("sorted", "shuffled", "again"))
    limit = 15.5 * len(json.dumps({"text": "# file 00\n" + BODY.strip("\n"), "source": "m00.py"}) + "\n") / 1e6
    plain = build_local_corpus(sorted_out, max_mb=limit, roots=[str(root)])
    shuffled = build_local_corpus(shuffled_out, max_mb=limit, roots=[str(root)], shuffle_seed=7)
    build_local_corpus(again_out, max_mb=limit, roots=[str(root)], shuffle_seed=7)
    lines = {n: open(p).read().splitlines(keepends=True) for n, p in
             (("sorted", sorted_out), ("shuffled", shuffled_out), ("again", again_out))}
    # the size limit picks the first 15 files in sorted order either way; only their order changes
    assert [json.loads(x)["source"] for x in lines["sorted"]] == [f"m{i:02d}.py" for i in range(15)]
    expected = list(lines["sorted"])
    random.Random(7).shuffle(expected)
    assert lines["shuffled"] == expected != lines["sorted"]
    assert lines["again"] == lines["shuffled"]
    assert shuffled == dict(plain, output=shuffled_out)
