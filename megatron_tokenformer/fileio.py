"""Durable and atomic file writes (standard library only: usable from ``data/`` and ``checkpointing/``).

* :func:`atomic_path`: a temporary path next to the target; on success it replaces the target with
  one ``os.replace`` (readers see the old file or the new one, never a mix); on error it is removed
  and the target is untouched.
* :func:`atomic_write_text`: the text case of the above.
* :func:`fsync_file`, :func:`fsync_dir`, :func:`fsync_tree`: make written bytes and renames durable.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from typing import Iterator

__all__ = ["atomic_path", "atomic_write_text", "fsync_file", "fsync_dir", "fsync_tree"]


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """Make a rename/creation inside ``path`` durable (no-op where directories cannot be fsynced)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """fsync every file and folder below ``path`` (and ``path`` itself)."""
    for root, _dirs, names in os.walk(path):
        for name in names:
            fsync_file(os.path.join(root, name))
        fsync_dir(root)


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "", fsync: bool = False) -> Iterator[str]:
    """Yield a unique temporary path beside ``path``; write it, and on leaving it replaces ``path``.

    ``suffix`` ends the temporary name (e.g. ``".npy"`` for ``numpy.save``, which appends one
    otherwise). ``fsync``: fsync the new file before the rename and the folder after it.
    Several processes may write the same target at once: each has its own temporary file and the
    last rename wins.
    """
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}"
    try:
        yield tmp
        if fsync:
            fsync_file(tmp)
        os.replace(tmp, path)
        if fsync:
            fsync_dir(os.path.dirname(os.path.abspath(path)))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str, text: str, fsync: bool = True) -> None:
    """Replace ``path`` by ``text`` atomically (durably with ``fsync``)."""
    with atomic_path(path, fsync=fsync) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
