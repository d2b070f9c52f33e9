"""tools/merge_datasets.py: prefixes and folders in, one pair out; bad inputs fail cleanly."""

import os
import subprocess
import sys

import numpy as np

from tests.helpers.paths import REPO_ROOT as REPO
from tests.helpers.paths import load_tool

SCRIPT = os.path.join(REPO, "tools", "merge_datasets.py")

merge_datasets = load_tool("merge_datasets")

from megatron_tokenformer.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder  # noqa: E402


def _write(prefix, docs):
    with IndexedDatasetBuilder(str(prefix), dtype=np.uint16) as b:
        for d in docs:
            b.add_document(np.asarray(d))


def test_merge_prefixes_and_folder(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    docs = {n: [[i + 10 * k for i in range(k + 1)] for k in range(3)] for n in ("s0", "s1", "s2")}
    for n, d in docs.items():
        _write(shards / n, d)
    assert merge_datasets.main(["--input", str(shards), "--output-prefix", str(tmp_path / "all")]) == 0
    ds = IndexedDataset(str(tmp_path / "all"))
    want = docs["s0"] + docs["s1"] + docs["s2"]
    assert [ds.get_document(i).tolist() for i in range(ds.num_documents)] == want
    # explicit prefixes (a .bin/.idx path works too), order kept
    assert merge_datasets.main(["--input", str(shards / "s2"), str(shards / "s0.idx"),
                                "--output-prefix", str(tmp_path / "two")]) == 0
    ds = IndexedDataset(str(tmp_path / "two"))
    assert [ds.get_document(i).tolist() for i in range(ds.num_documents)] == docs["s2"] + docs["s0"]


def test_bad_inputs_subprocess(tmp_path):
    _write(tmp_path / "good", [[1, 2, 3]])
    _write(tmp_path / "broken", [[1, 2, 3], [4, 5]])
    with open(tmp_path / "broken.bin", "r+b") as f:
        f.truncate(4)
    r = subprocess.run([sys.executable, SCRIPT, "--input", str(tmp_path / "good"), str(tmp_path / "broken"),
                        "--output-prefix", str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "merge_datasets.py: error:" in r.stderr and "broken.bin" in r.stderr and "truncated" in r.stderr
    assert not list(tmp_path.glob("out*"))
    r = subprocess.run([sys.executable, SCRIPT, "--input", str(tmp_path / "nope"),
                        "--output-prefix", str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "nope" in r.stderr


def test_output_overlapping_an_input_is_refused(tmp_path, capsys):
    """Issue 20 item 1: an output inside an --input folder, or an input reached through a symlink, is
    refused in one line (exit 2); the inputs stay byte-identical and nothing is written."""
    from tests.helpers.ops_checks import tree_hashes
    shards = tmp_path / "shards"
    shards.mkdir()
    _write(shards / "s0", [[1, 2, 3]])
    _write(shards / "s1", [[4, 5]])
    (tmp_path / "link").symlink_to(shards)
    before = tree_hashes(str(tmp_path))
    for argv in (["--input", str(shards), "--output-prefix", str(shards / "all")],
                 ["--input", str(shards / "s0"), str(shards / "s1"), "--output-prefix", str(tmp_path / "link" / "s0")],
                 ["--input", str(tmp_path / "link"), "--output-prefix", str(shards / "s1")]):
        assert merge_datasets.main(argv) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith("merge_datasets.py: error: --output-prefix ")
        assert "overlaps the source --input" in err[0]
        assert tree_hashes(str(tmp_path)) == before
