"""megatron_tokenformer.fileio: atomic replacement (old or new content, never a mix; nothing left on error)."""

import os

import numpy as np
import pytest

from megatron_tokenformer import fileio


def test_atomic_write_text_replaces(tmp_path):
    path = str(tmp_path / "latest")
    fileio.atomic_write_text(path, "a\n")
    fileio.atomic_write_text(path, "b\n")
    assert open(path).read() == "b\n" and os.listdir(tmp_path) == ["latest"]


def test_atomic_path_error_keeps_old_and_cleans_up(tmp_path):
    path = str(tmp_path / "x.npy")
    np.save(path, np.arange(3))
    with pytest.raises(RuntimeError):
        with fileio.atomic_path(path, suffix=".npy") as tmp:
            np.save(tmp, np.arange(5))          # written completely, then the writer fails
            raise RuntimeError("boom")
    assert np.load(path).tolist() == [0, 1, 2] and os.listdir(tmp_path) == ["x.npy"]


def test_atomic_path_suffix_and_fsync(tmp_path):
    path = str(tmp_path / "x.npy")
    with fileio.atomic_path(path, suffix=".npy", fsync=True) as tmp:
        assert tmp.endswith(".npy") and os.path.dirname(tmp) == str(tmp_path)
        np.save(tmp, np.arange(4))              # numpy keeps the name because it ends in .npy
    assert np.load(path).tolist() == [0, 1, 2, 3] and os.listdir(tmp_path) == ["x.npy"]


def test_fileio_is_torch_free():
    import subprocess
    import sys
    code = "import sys, megatron_tokenformer.fileio; assert 'torch' not in sys.modules; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "ok", proc.stderr


# --------------------------------------------------------------------------- outputs apart from inputs
@pytest.fixture
def tree(tmp_path):
    run = tmp_path / "runs" / "run1"
    (run / "global_step2").mkdir(parents=True)
    (run / "global_step2" / "w.pt").write_bytes(b"weights")
    (tmp_path / "link").symlink_to(run)              # a symlink to the run folder
    os.link(run / "global_step2" / "w.pt", tmp_path / "hard.pt")
    return tmp_path, run


@pytest.mark.parametrize("out, inp, how", [
    ("runs/run1", "runs/run1", "the same path"),
    ("runs/run1/", "./runs/../runs/run1", "the same path"),               # relative spellings
    ("link", "runs/run1", "the same path"),                               # a symlink resolves to the input
    ("runs", "runs/run1", "--load is inside --save"),                      # a parent of the input
    ("runs/run1/hf", "runs/run1", "--save is inside --load"),
    ("link/hf", "runs/run1", "--save is inside --load"),
    ("hard.pt", "runs/run1/global_step2/w.pt", "the same file"),          # a hard link
])
def test_check_outputs_apart_refuses_every_overlap(tree, monkeypatch, out, inp, how):
    tmp_path, _ = tree
    monkeypatch.chdir(tmp_path)
    with pytest.raises(fileio.OverlapError) as info:
        fileio.check_outputs_apart([("--save", out)], [("--other", None), ("--load", inp)])
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"--save {out}") and f"the source --load {inp}" in msg
    assert f"({how})" in msg and "with --overwrite or without" in msg


def test_check_outputs_apart_accepts_neighbours(tree, monkeypatch):
    tmp_path, run = tree
    monkeypatch.chdir(tmp_path)
    for out in ("runs/run10", "runs/run1_hf", "runs/run", str(tmp_path / "elsewhere")):   # a name prefix is not a parent
        fileio.check_outputs_apart([("--save", out)], [("--load", "runs/run1"), ("--load", "link")])


def test_remove_stale_temporaries_only_of_dead_pids(tmp_path):
    import subprocess
    import sys
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()                                                     # a pid that no longer runs
    target = tmp_path / "corpus_text_document.bin"
    stale = [tmp_path / f"corpus_text_document.bin.tmp-{dead.pid}-0123abcd",
             tmp_path / f"corpus_text_document.idx.tmp-{dead.pid}-89abcdef"]
    live = tmp_path / f"corpus_text_document.bin.tmp-{os.getpid()}-0123abcd"       # a concurrent writer: kept
    other = tmp_path / f"other_text_document.bin.tmp-{dead.pid}-0123abcd"          # another prefix: kept
    plain = tmp_path / "corpus_text_document.bin.tmp-notes"                          # not our pattern: kept
    for p in stale + [live, other, plain]:
        p.write_bytes(b"x")
    removed = fileio.remove_stale_temporaries([str(target), str(tmp_path / "corpus_text_document.idx")])
    assert removed == sorted(str(p) for p in stale)
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in (live, other, plain))
