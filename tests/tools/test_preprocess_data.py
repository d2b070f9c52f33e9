"""tools/preprocess_data.py: Megatron flags, in-process and as a subprocess (exit codes)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers.paths import REPO_ROOT as REPO
from tests.helpers.paths import load_tool

SCRIPT = os.path.join(REPO, "tools", "preprocess_data.py")

preprocess_data = load_tool("preprocess_data")

from megatron_tokenformer.data.indexed_dataset import IndexedDataset  # noqa: E402
from megatron_tokenformer.data.tokenizer import SentencePieceTokenizer, train_sentencepiece  # noqa: E402

DOCS = [
    "First document.\nIt has two lines.",
    "Second one: café, naïve, 東京 and a tab\there.",
    "  indented third  ",
] * 20


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    lines = [l for doc in DOCS for l in doc.split("\n")] * 5
    return train_sentencepiece(iter(lines), str(d / "tok"), 320, num_threads=1)


def test_jsonl_megatron_flags(tmp_path, model, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    rc = preprocess_data.main(["--input", str(src), "--output-prefix", str(tmp_path / "out"),
                               "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", model,
                               "--json-keys", "text", "--append-eod", "--workers", "2",
                               "--log-interval", "20", "--chunk-mb", "0.001"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "Processed 20 documents" in err and "tokens/s" in err and "MB/s" in err
    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    tok = SentencePieceTokenizer(model)
    assert ds.num_documents == len(DOCS) and ds.dtype == np.uint16
    for i, d in enumerate(DOCS):
        ids = ds.get_document(i)
        assert ids[-1] == tok.eod and tok.detokenize(ids[:-1]) == d


def test_plain_text_modes(tmp_path, model):
    src = tmp_path / "in.txt"
    src.write_text("\n\n".join(DOCS[:3]) + "\n")
    assert preprocess_data.main(["--input", str(src), "--output-prefix", str(tmp_path / "b"),
                                 "--tokenizer-model", model]) == 0
    assert IndexedDataset(str(tmp_path / "b_text_document")).num_documents == 3
    assert preprocess_data.main(["--input", str(src), "--output-prefix", str(tmp_path / "f"),
                                 "--tokenizer-model", model, "--document-boundary", "file"]) == 0
    ds = IndexedDataset(str(tmp_path / "f_text_document"))
    assert ds.num_documents == 1
    assert SentencePieceTokenizer(model).detokenize(ds.get_document(0)) == src.read_text()


def test_null_tokenizer_int32_when_vocab_is_large(tmp_path):
    src = tmp_path / "ids.txt"
    src.write_text("1 2 3\n\n70000 5\n")
    assert preprocess_data.main(["--input", str(src), "--output-prefix", str(tmp_path / "n"),
                                 "--tokenizer-type", "NullTokenizer", "--vocab-size", "100000",
                                 "--append-eod"]) == 0
    ds = IndexedDataset(str(tmp_path / "n_text_document"))
    assert ds.dtype == np.int32
    assert [ds[i].tolist() for i in range(2)] == [[1, 2, 3, 100000], [70000, 5, 100000]]


def _run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=120)


def test_subprocess_exit_codes(tmp_path, model):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "ok"}\n"just a string"\n')
    r = _run("--input", str(src), "--output-prefix", str(tmp_path / "o"), "--tokenizer-model", model)
    assert r.returncode == 1
    assert f"preprocess_data.py: error: {src}:2: a JSON line must be an object, got str" in r.stderr
    assert "Traceback" not in r.stderr
    assert not list(tmp_path.glob("o_*"))

    r = _run("--input", str(src), "--output-prefix", str(tmp_path / "o"), "--tokenizer-model", model,
             "--skip-bad-lines", "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert "Skipped 1 bad lines" in r.stderr and f"{src}:2" in r.stderr

    r = _run("--input", str(src), "--output-prefix", str(tmp_path / "p"), "--tokenizer-model",
             str(tmp_path / "missing.model"))
    assert r.returncode == 1 and "missing.model: tokenizer model not found" in r.stderr
    assert not list(tmp_path.glob("p_*"))

    r = _run("--output-prefix", str(tmp_path / "p"))  # argparse: --input is required
    assert r.returncode == 2 and "--input" in r.stderr


def test_existing_output_prefix_refused_unless_overwrite(tmp_path, model, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[:3]))
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"text": "a different corpus"}) + "\n")
    prefix = str(tmp_path / "ds")
    assert preprocess_data.main(["--input", str(src), "--output-prefix", prefix, "--tokenizer-model", model]) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.glob("ds_*")}
    assert {"ds_text_document.bin", "ds_text_document.idx"} <= set(before)
    capsys.readouterr()
    rc = preprocess_data.main(["--input", str(other), "--output-prefix", prefix, "--tokenizer-model", model])
    err = capsys.readouterr().err
    assert rc == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("preprocess_data.py: error: --output-prefix ")
    assert "ds_text_document.bin" in lines[0] and "--overwrite" in lines[0]
    assert {p.name: p.read_bytes() for p in tmp_path.glob("ds_*")} == before   # untouched
    rc = preprocess_data.main(["--input", str(other), "--output-prefix", prefix, "--tokenizer-model", model,
                               "--overwrite"])
    assert rc == 0
    assert IndexedDataset(prefix + "_text_document").num_documents == 1


def _one_error_line(err, tool="preprocess_data.py"):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{tool}: error: "), lines
    return lines[0]


def test_output_overlapping_an_input_is_refused_with_overwrite_too(tmp_path, model, capsys):
    """Issue 20 item 1: an output inside an --input folder, or a .bin/.idx that is itself an --input (by
    name or through a symlink), is refused in one line; the inputs stay byte-identical."""
    from tests.helpers.ops_checks import tree_hashes
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[:3]))
    assert preprocess_data.main(["--input", str(corpus), "--output-prefix", str(tmp_path / "ds"),
                                 "--tokenizer-model", model]) == 0
    (tmp_path / "link").symlink_to(corpus)
    capsys.readouterr()
    before = tree_hashes(str(tmp_path))
    for inputs, prefix, flag in (([str(corpus)], str(corpus / "ds"), "--input"),
                                 ([str(tmp_path / "link")], str(corpus / "ds"), "--input"),
                                 ([str(corpus)], str(tmp_path / "link" / "ds"), "--input"),
                                 ([str(tmp_path / "ds_text_document.idx")], str(tmp_path / "ds"), "--input"),
                                 ([str(corpus / "*.jsonl")], str(tmp_path / "x"), None),
                                 ([str(corpus)], str(tmp_path / "tokprefix"), None)):
        rc = preprocess_data.main(["--input", *inputs, "--output-prefix", prefix, "--tokenizer-model", model,
                                   "--overwrite"])
        err = capsys.readouterr().err
        if flag is None:           # no overlap: accepted (and cleaned away so the tree compares)
            assert rc == 0, err
            for p in tmp_path.glob(os.path.basename(prefix) + "_text_document*"):
                p.unlink()
            continue
        line = _one_error_line(err)
        assert rc == 2 and "overlaps the source --input" in line and "with --overwrite or without" in line, line
        assert tree_hashes(str(tmp_path)) == before
    model_copy = tmp_path / "m_text_document.bin"      # the tokenizer model is an input too
    model_copy.write_bytes(open(model, "rb").read())
    rc = preprocess_data.main(["--input", str(corpus), "--output-prefix", str(tmp_path / "m"), "--tokenizer-model",
                               str(model_copy), "--overwrite"])
    assert rc == 2 and "overlaps the source --tokenizer-model" in _one_error_line(capsys.readouterr().err)
    assert model_copy.read_bytes() == open(model, "rb").read()


def test_full_disk_names_the_output_file(tmp_path, model, capsys):
    """Issue 20 item 8: ENOSPC while writing the .bin names the file (it said only 'No space left on
    device'); nothing is left on the full file system."""
    from tests.helpers.small_fs import small_tmpfs
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS * 40))     # ~40 k tokens: > 64 KiB
    with small_tmpfs(tmp_path / "mnt", "64k") as mnt:
        prefix = os.path.join(mnt, "ds")
        rc = preprocess_data.main(["--input", str(src), "--output-prefix", prefix, "--tokenizer-model", model])
        line = _one_error_line(capsys.readouterr().err)
        assert rc == 1 and "No space left on device" in line and f"{prefix}_text_document.bin" in line, line
        assert os.listdir(mnt) == []


def test_killed_run_leaves_temporaries_that_the_next_run_removes(tmp_path, model):
    """Issue 20 item 8: a SIGKILLed preprocess_data.py leaves PREFIX_text_document.*.tmp-PID-* files; the
    next run into that prefix removes those of dead pids (named in one line), keeps a live writer's."""
    import signal
    import time
    src = tmp_path / "big.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS * 2000))
    prefix = str(tmp_path / "ds")
    proc = subprocess.Popen([sys.executable, SCRIPT, "--input", str(src), "--output-prefix", prefix,
                             "--tokenizer-model", model, "--chunk-mb", "0.01"], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not [n for n in os.listdir(tmp_path) if ".tmp-" in n]:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)       # the tool and its pool workers (this test's own processes)
    proc.wait()
    left = sorted(n for n in os.listdir(tmp_path) if ".tmp-" in n)
    assert left and all(f".tmp-{proc.pid}-" in n for n in left) and not os.path.exists(prefix + "_text_document.idx")
    live = tmp_path / f"ds_text_document.bin.tmp-{os.getpid()}-0123abcd"      # a writer that still runs: kept
    live.write_bytes(b"x")
    small = tmp_path / "small.jsonl"                                       # the next run: any input will do
    small.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[:3]))
    r = subprocess.run([sys.executable, SCRIPT, "--input", str(small), "--output-prefix", prefix,
                        "--tokenizer-model", model], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    note = [line for line in r.stderr.splitlines() if line.startswith("removed ")]
    assert len(note) == 1 and f"{len(left)} temporary files" in note[0] and all(n in note[0] for n in left)
    assert sorted(n for n in os.listdir(tmp_path) if ".tmp-" in n) == [live.name]
    assert IndexedDataset(prefix + "_text_document").num_documents == 3
