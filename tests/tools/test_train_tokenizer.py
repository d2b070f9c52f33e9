"""tools/train_tokenizer.py: in-process and as a subprocess."""

import json
import os
import random
import subprocess
import sys

from tests.helpers.paths import REPO_ROOT as REPO
from tests.helpers.paths import load_tool

train_tokenizer = load_tool("train_tokenizer")

from megatron_tokenformer.data.tokenizer import SentencePieceTokenizer  # noqa: E402


def _text(seed, n=300):
    rng = random.Random(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()
    return ["".join(rng.choice(words) + rng.choice([" ", ", ", ". "]) for _ in range(rng.randint(3, 12))).strip()
            for _ in range(n)]


def test_bpe_from_folder_and_jsonl(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("\n\n".join(_text(1)) + "\n")
    with open(folder / "b.jsonl", "w") as f:
        for t in _text(2):
            f.write(json.dumps({"content": t, "text": t}) + "\n")
    rc = train_tokenizer.main(["--input", str(folder), "--output-prefix", str(tmp_path / "tok"),
                               "--vocab-size", "380", "--num-threads", "1"])
    assert rc == 0
    assert (tmp_path / "tok.model").exists() and (tmp_path / "tok.vocab").exists()
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]
    tok = SentencePieceTokenizer(str(tmp_path / "tok.model"))
    assert tok.vocab_size == 380 and tok.eod == 2 and tok.pad == 3
    vocab_lines = (tmp_path / "tok.vocab").read_text().splitlines()
    assert len(vocab_lines) == 380
    assert [l.split("\t")[0] for l in vocab_lines[:4]] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert "<0x0A>" in (tmp_path / "tok.vocab").read_text()  # byte fallback pieces
    s = "gamma delta\n  über"
    assert tok.detokenize(tok.tokenize(s)) == s


def test_unigram_sampled_subset(tmp_path):
    src = tmp_path / "c.jsonl"
    with open(src, "w") as f:
        for t in _text(3, 2000):
            f.write(json.dumps({"body": t}) + "\n")
    rc = train_tokenizer.main(["--input", str(src), "--json-keys", "body", "--output-prefix",
                               str(tmp_path / "u"), "--vocab-size", "290", "--model-type", "unigram",
                               "--input-sentence-size", "500", "--num-threads", "1"])
    assert rc == 0
    tok = SentencePieceTokenizer(str(tmp_path / "u.model"))
    assert tok.vocab_size == 290


def test_vocab_too_large_for_corpus(tmp_path, capsys):
    src = tmp_path / "small.txt"
    src.write_text("tiny corpus\n")
    rc = train_tokenizer.main(["--input", str(src), "--output-prefix", str(tmp_path / "t"),
                               "--vocab-size", "5000", "--num-threads", "1"])
    assert rc == 1
    assert "--vocab-size 5000 is too large for this corpus (at most" in capsys.readouterr().err
    rc = train_tokenizer.main(["--input", str(src), "--output-prefix", str(tmp_path / "t"),
                               "--vocab-size", "100", "--num-threads", "1"])
    assert rc == 1
    assert "--vocab-size 100 is too small: this corpus needs at least" in capsys.readouterr().err
    assert not list(tmp_path.glob("t.*"))


def test_errors_as_subprocess(tmp_path):
    script = os.path.join(REPO, "tools", "train_tokenizer.py")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    r = subprocess.run([sys.executable, script, "--input", str(empty), "--output-prefix",
                        str(tmp_path / "t"), "--vocab-size", "300"], capture_output=True, text=True)
    assert r.returncode == 1
    assert "train_tokenizer.py: error: empty input" in r.stderr and "empty.txt" in r.stderr
    assert "Traceback" not in r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no key"}\n')
    r = subprocess.run([sys.executable, script, "--input", str(bad), "--output-prefix",
                        str(tmp_path / "t"), "--vocab-size", "300"], capture_output=True, text=True)
    assert r.returncode == 1 and f"{bad}:2: the JSON object has no key 'text'" in r.stderr
    assert not list(tmp_path.glob("t.*"))


def test_bad_line_in_the_middle_of_training_stops_cleanly(tmp_path):
    src = tmp_path / "c.jsonl"
    lines = [json.dumps({"text": t}) for t in _text(4, 500)]
    lines[300] = "[1, 2, 3]"
    src.write_text("\n".join(lines) + "\n")
    rc = train_tokenizer.main(["--input", str(src), "--output-prefix", str(tmp_path / "t"),
                               "--vocab-size", "300", "--num-threads", "1"])
    assert rc == 1
    assert not list(tmp_path.glob("t.*"))
    rc = train_tokenizer.main(["--input", str(src), "--output-prefix", str(tmp_path / "t"),
                               "--vocab-size", "300", "--num-threads", "1", "--skip-bad-lines"])
    assert rc == 0 and (tmp_path / "t.model").exists()


def test_output_overlapping_an_input_is_refused(tmp_path, capsys):
    """Issue 20 item 1: tok.model/.vocab/.json inside an --input folder, or equal to an --input file
    (also through a symlink), is refused in one line (exit 2); the inputs stay byte-identical."""
    from tests.helpers.ops_checks import tree_hashes
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("\n\n".join(_text(1)) + "\n")
    (tmp_path / "link").symlink_to(folder)
    before = tree_hashes(str(tmp_path))
    for argv in (["--input", str(folder), "--output-prefix", str(folder / "tok")],
                 ["--input", str(tmp_path / "link"), "--output-prefix", str(folder / "tok")],
                 ["--input", str(tmp_path / "link" / "tok.json"), "--output-prefix", str(folder / "tok"),
                  "--tokenizer-type", "HFTokenizer"]):           # the output file is the input file
        if argv[1].endswith("tok.json"):
            (folder / "tok.json").write_text("{}")
        rc = train_tokenizer.main(argv + ["--vocab-size", "300", "--num-threads", "1"])
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert rc == 2 and len(err) == 1 and err[0].startswith("train_tokenizer.py: error: --output-prefix ")
        assert "overlaps the source --input" in err[0], err
        if (folder / "tok.json").exists():
            assert (folder / "tok.json").read_text() == "{}"
            (folder / "tok.json").unlink()
        assert tree_hashes(str(tmp_path)) == before
