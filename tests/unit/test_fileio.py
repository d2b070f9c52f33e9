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
    # a name prefix is not a parent
    for out in ("runs/run10", "runs/run1_hf", "runs/run", str(tmp_path / "elsewhere")):
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


# --------------------------------------------------------------------------- atomic bytes, durable writes
def _tree(root):
    """{relative path: bytes} of every file below ``root``."""
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def test_atomic_write_bytes_fsyncs_file_then_renames_then_fsyncs_folder(tmp_path, monkeypatch):
    path = str(tmp_path / "status")
    fileio.atomic_write_bytes(path, b"old\n")
    events = []
    real_replace = os.replace
    monkeypatch.setattr(fileio, "fsync_file", lambda p: events.append(("fsync_file", os.path.dirname(p))))
    monkeypatch.setattr(fileio, "fsync_dir", lambda p: events.append(("fsync_dir", p)))
    monkeypatch.setattr(fileio.os, "replace", lambda a, b: (events.append(("replace", b)), real_replace(a, b)))
    fileio.atomic_write_bytes(path, b"\x00new\xff")
    assert events == [("fsync_file", str(tmp_path)), ("replace", path), ("fsync_dir", str(tmp_path))]
    assert open(path, "rb").read() == b"\x00new\xff" and os.listdir(tmp_path) == ["status"]


def test_atomic_write_bytes_failure_keeps_old_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = str(tmp_path / "status")
    fileio.atomic_write_text(path, "finished 3/3\n")

    def refuse(a, b):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(fileio.os, "replace", refuse)
    with pytest.raises(OSError, match="No space"):
        fileio.atomic_write_bytes(path, b"unfinished 1/3\n")
    assert open(path).read() == "finished 3/3\n" and os.listdir(tmp_path) == ["status"]


def test_durable_write_fsyncs_and_an_error_removes_the_file(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(fileio.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                        real_fsync(fd)))
    path = str(tmp_path / "meta.json")
    with fileio.durable_write(path, "w") as f:
        f.write("{}\n")
    assert open(path).read() == "{}\n" and synced == [path]
    with fileio.durable_write(str(tmp_path / "scratch"), fsync=False) as f:
        f.write(b"x")
    assert synced == [path]                                        # fsync=False: left to the OS
    with pytest.raises(RuntimeError, match="disk"):
        with fileio.durable_write(str(tmp_path / "half.pt")) as f:
            f.write(b"half")
            raise RuntimeError("basic_ios::clear: iostream error (disk full)")
    assert sorted(os.listdir(tmp_path)) == ["meta.json", "scratch"]  # no half-written file left


# --------------------------------------------------------------------------- replace_dir / swap_dir
def _folder(path, files):
    os.makedirs(path, exist_ok=True)
    for name, data in files.items():
        os.makedirs(os.path.dirname(os.path.join(path, name)) or path, exist_ok=True)
        with open(os.path.join(path, name), "wb") as f:
            f.write(data)


OLD = {"latest": b"global_step2\n", "global_step2/model.pt": b"old weights"}
NEW = {"latest": b"global_step4\n", "global_step4/model.pt": b"new weights", "global_step4/meta.json": b"{}"}


@pytest.mark.parametrize("before", ["absent", "empty", "full"])
def test_replace_dir_publishes_the_staged_folder(tmp_path, before):
    save = str(tmp_path / "out")
    if before != "absent":
        _folder(save, OLD if before == "full" else {})
    with fileio.replace_dir(save) as staging:
        assert staging == save + f".partial-{os.getpid()}" and os.listdir(staging) == []
        _folder(staging, NEW)
        assert _tree(save) == (OLD if before == "full" else {})     # nothing visible until the end
    assert _tree(save) == NEW and os.listdir(tmp_path) == ["out"]   # no staging, no old copy left


def test_replace_dir_failure_mid_stage_keeps_the_old_folder_and_leaves_no_temporary(tmp_path):
    save = str(tmp_path / "out")
    _folder(save, OLD)
    with pytest.raises(OSError, match="No space"):
        with fileio.replace_dir(save) as staging:
            _folder(staging, {"global_step4/model.pt": b"half"})
            raise OSError(28, "No space left on device")
    assert _tree(save) == OLD and os.listdir(tmp_path) == ["out"]
    with pytest.raises(KeyboardInterrupt):                          # not only OS errors: any exit
        with fileio.replace_dir(save) as staging:
            _folder(staging, NEW)
            raise KeyboardInterrupt
    assert _tree(save) == OLD and os.listdir(tmp_path) == ["out"]


def test_replace_dir_failed_swap_puts_back_the_old_folder_and_the_carried_files(tmp_path, monkeypatch):
    save = str(tmp_path / "out")
    _folder(save, dict(OLD, **{"save.lock": b"holder"}))
    lock = os.path.join(save, "save.lock")
    inode = os.stat(lock).st_ino
    real_replace = os.replace

    def refuse_the_new_folder(a, b):
        if a.endswith(f".partial-{os.getpid()}"):
            raise OSError(13, "Permission denied")
        return real_replace(a, b)
    monkeypatch.setattr(fileio.os, "replace", refuse_the_new_folder)
    with pytest.raises(OSError, match="Permission denied"):
        with fileio.replace_dir(save, carry=[lock]) as staging:
            _folder(staging, NEW)
    assert _tree(save) == dict(OLD, **{"save.lock": b"holder"}) and os.stat(lock).st_ino == inode
    assert os.listdir(tmp_path) == ["out"]


def test_replace_dir_carries_files_into_the_new_folder(tmp_path):
    save = str(tmp_path / "out")
    _folder(save, dict(OLD, **{"save.lock": b"holder"}))
    inode = os.stat(os.path.join(save, "save.lock")).st_ino
    with fileio.replace_dir(save, carry=[os.path.join(save, "save.lock")]) as staging:
        _folder(staging, NEW)
    assert _tree(save) == dict(NEW, **{"save.lock": b"holder"})
    assert os.stat(os.path.join(save, "save.lock")).st_ino == inode  # the same file (a held lock follows it)


def test_replace_dir_fsyncs_the_staged_tree_before_the_swap(tmp_path, monkeypatch):
    save = str(tmp_path / "out")
    _folder(save, OLD)
    events = []
    real_replace, real_tree = os.replace, fileio.fsync_tree
    monkeypatch.setattr(fileio, "fsync_tree", lambda p: (events.append(("fsync_tree", p)), real_tree(p)))
    monkeypatch.setattr(fileio.os, "replace", lambda a, b: (events.append(("replace", a, b)), real_replace(a, b)))
    with fileio.replace_dir(save) as staging:
        _folder(staging, NEW)
    aside = f"{save}.old-{os.getpid()}"
    assert events == [("fsync_tree", staging), ("replace", save, aside), ("replace", staging, save)]
    events.clear()
    with fileio.replace_dir(save, fsync=False) as staging:
        _folder(staging, OLD)
    assert [e[0] for e in events] == ["replace", "replace"] and _tree(save) == OLD


def test_replace_dir_removes_a_staging_folder_left_by_an_earlier_attempt(tmp_path):
    save = str(tmp_path / "out")
    _folder(fileio.staging_path(save), {"stale.pt": b"from a killed attempt"})
    with fileio.replace_dir(save) as staging:
        assert os.listdir(staging) == []
        _folder(staging, NEW)
    assert _tree(save) == NEW and os.listdir(tmp_path) == ["out"]


def test_swap_dir_with_a_fixed_aside_name(tmp_path):
    """publish_step_dir's form: ``global_step<N>.partial`` -> ``global_step<N>``, the older folder moved
    to ``global_step<N>.old`` (one left by a crash is deleted first)."""
    final = str(tmp_path / "global_step4")
    _folder(final, {"model.pt": b"old"})
    _folder(final + ".old", {"model.pt": b"older, left by a crash"})
    _folder(final + ".partial", {"model.pt": b"new"})
    fileio.swap_dir(final + ".partial", final, aside=final + ".old")
    assert _tree(final) == {"model.pt": b"new"} and os.listdir(tmp_path) == ["global_step4"]
