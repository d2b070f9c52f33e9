"""A small tmpfs mounted for one test (a full disk that is real, not simulated); needs root and mount.

    with small_tmpfs(tmp_path / "mnt", "64k") as mnt: ...   # skips the test with one reason line otherwise
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from typing import Iterator

import pytest


@contextlib.contextmanager
def small_tmpfs(path, size: str = "64k") -> Iterator[str]:
    path = str(path)
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], capture_output=True)
