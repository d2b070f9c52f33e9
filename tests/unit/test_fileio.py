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
