"""tools/build_local_corpus.py: deterministic, bounded, valid JSON-lines from local files."""

import json

from tests.helpers.paths import load_tool

build_local_corpus = load_tool("build_local_corpus")


def test_deterministic_and_bounded(tmp_path):
    out1, out2 = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert build_local_corpus.main(["--output", str(out1), "--max-mb", "0.5"]) == 0
    assert build_local_corpus.main(["--output", str(out2), "--max-mb", "0.5"]) == 0
    data = out1.read_bytes()
    assert data == out2.read_bytes()
    assert 0 < len(data) <= 500_000
    objs = [json.loads(l) for l in data.decode("utf-8").splitlines()]
    assert len(objs) > 3 and all(o["text"].strip() and o["source"] for o in objs)
    # plain-text output: the same files, separated by blank lines
    out3 = tmp_path / "c.txt"
    assert build_local_corpus.main(["--output", str(out3), "--max-mb", "0.2", "--roots", str(tmp_path)]) == 1
    root = tmp_path / "src"
    root.mkdir()
    (root / "b.py").write_text("x = 1\n" * 50)
    (root / "a.txt").write_text("hello world\n" * 30)
    assert build_local_corpus.main(["--output", str(out3), "--roots", str(root)]) == 0
    assert out3.read_text() == ("hello world\n" * 30).strip("\n") + "\n\n" + ("x = 1\n" * 50).strip("\n") + "\n\n"


def test_output_inside_a_root_is_refused(tmp_path, capsys):
    """Issue 20 item 1: the corpus file inside a --roots folder (directly or through a symlink) is refused in
    one line; the root stays byte-identical."""
    from tests.helpers.ops_checks import tree_hashes
    root = tmp_path / "src"
    root.mkdir()
    (root / "a.txt").write_text("hello world\n" * 30)
    (tmp_path / "link").symlink_to(root)
    before = tree_hashes(str(tmp_path))
    for out in (root / "corpus.txt", tmp_path / "link" / "corpus.jsonl"):
        assert build_local_corpus.main(["--output", str(out), "--roots", str(root)]) == 1
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith(f"build_local_corpus.py: error: --output {out}")
        assert f"overlaps the source --roots {root}" in err[0]
        assert tree_hashes(str(tmp_path)) == before
