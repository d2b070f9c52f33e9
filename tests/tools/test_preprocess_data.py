"""tools/preprocess_data.py: Megatron flags, in-process and as a subprocess (exit codes)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers.paths import REPO_ROOT as REPO
SCRIPT = os.path.join(REPO, "tools", "preprocess_data.py")
from tests.helpers.paths import load_tool

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
