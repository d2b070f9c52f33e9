"""Durable and atomic file writes (standard library only: usable from ``data/`` and ``checkpointing/``).

* :func:`atomic_path`: a temporary path next to the target; on success it replaces the target with
  one ``os.replace`` (readers see the old file or the new one, never a mix); on error it is removed
  and the target is untouched.
* :func:`atomic_write_text`: the text case of the above.
* :func:`fsync_file`, :func:`fsync_dir`, :func:`fsync_tree`: make written bytes and renames durable.
* :func:`check_outputs_apart`: the rule of every tool that writes: no output overlaps an input (the
  same path, one inside the other; symlinks and relative paths resolved), with ``--overwrite`` or
  without. :class:`OverlapError` carries the one line naming both flags and paths.
* :func:`remove_stale_temporaries`: the ``<target>.tmp-<pid>-<hex>`` files of :func:`atomic_path`
  (and the dataset builder) left by a killed process whose pid is no longer alive on this host.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

from megatron_tokenformer.errors import TokenformerError

__all__ = ["atomic_path", "atomic_write_text", "fsync_file", "fsync_dir", "fsync_tree", "OverlapError",
           "overlap", "check_outputs_apart", "tmp_name", "pid_alive", "remove_stale_temporaries"]


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
    tmp = tmp_name(path) + suffix
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


# --------------------------------------------------------------------------- temporaries
_TMP_RE = re.compile(r"\.tmp-(\d+)-[0-9a-f]{8}(\.[A-Za-z0-9]+)?$")


def tmp_name(path: str) -> str:
    """``<path>.tmp-<pid>-<8 hex>``: a temporary name beside ``path``, unique to this process."""
    return f"{os.fspath(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a process of another user counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(targets: Iterable[str]) -> List[str]:
    """Remove ``<target>.tmp-<pid>-<hex>[.ext]`` files whose pid is not alive on this host.

    ``targets``: the final paths a writer is about to produce (e.g. ``PREFIX.bin``, ``PREFIX.idx``).
    Temporaries of a live pid (a concurrent writer on this host) are kept. The pid is only known on
    this host: on a shared folder, a writer on another host whose pid happens to be dead here would
    lose its temporary and fail at its rename (never a mixed file). Returns the removed paths, sorted.
    """
    removed = []
    by_dir = {}
    for target in targets:
        target = os.path.abspath(os.fspath(target))
        by_dir.setdefault(os.path.dirname(target), set()).add(os.path.basename(target))
    for folder, names in by_dir.items():
        try:
            entries = os.listdir(folder)
        except OSError:
            continue
        for entry in entries:
            m = _TMP_RE.search(entry)
            if not m or entry[:m.start()] not in names or pid_alive(int(m.group(1))):
                continue
            path = os.path.join(folder, entry)
            try:
                os.remove(path)
                removed.append(path)
            except FileNotFoundError:
                pass
    return sorted(removed)


# --------------------------------------------------------------------------- outputs apart from inputs
class OverlapError(TokenformerError, ValueError):
    """An output of a tool overlaps one of its inputs (one line naming both flags and paths)."""


def _resolved(path: str) -> str:
    return os.path.realpath(os.path.abspath(os.path.expanduser(os.fspath(path))))


def _inside(path: str, parent: str) -> bool:
    return path.startswith(parent.rstrip(os.sep) + os.sep)


def overlap(output: str, input_: str) -> Optional[str]:
    """How ``output`` overlaps ``input_`` ("the same path", "... inside ..."), or None.

    Paths are compared after resolving ``~``, relative parts and symlinks (of the parts that exist);
    two existing paths that are one file (a hard link) are the same path too.
    """
    out, inp = _resolved(output), _resolved(input_)
    if out == inp:
        return "the same path"
    try:
        if os.path.exists(out) and os.path.exists(inp) and os.path.samefile(out, inp):
            return "the same file"
    except OSError:
        pass
    if _inside(out, inp):
        return "the output is inside the input"
    if _inside(inp, out):
        return "the input is inside the output"
    return None


def check_outputs_apart(outputs: Sequence[Tuple[str, str]], inputs: Sequence[Tuple[str, Optional[str]]]) -> None:
    """Raise :class:`OverlapError` when an output overlaps an input; nothing is read or written.

    ``outputs`` / ``inputs``: ``(flag, path)`` pairs, e.g. ``[("--save", args.save)]`` and
    ``[("--load", args.load)]`` (an input path None is skipped). Holds with ``--overwrite`` too: a tool
    that replaced its output would delete what it reads.
    """
    for out_flag, out in outputs:
        for in_flag, inp in inputs:
            if not inp:
                continue
            how = overlap(out, inp)
            if how is None:
                continue
            shown_out = out if _resolved(out) == os.path.abspath(out) else f"{out} (= {_resolved(out)})"
            shown_in = inp if _resolved(inp) == os.path.abspath(inp) else f"{inp} (= {_resolved(inp)})"
            how = {"the output is inside the input": f"{out_flag} is inside {in_flag}",
                   "the input is inside the output": f"{in_flag} is inside {out_flag}"}.get(how, how)
            raise OverlapError(f"{out_flag} {shown_out} overlaps the source {in_flag} {shown_in} ({how}); a tool "
                               f"never writes where it reads, with --overwrite or without: choose a {out_flag} "
                               f"apart from every input")
