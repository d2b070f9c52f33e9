"""Durable and atomic file writes (standard library only: usable from ``data/`` and ``checkpointing/``).

* :func:`atomic_path`: a temporary path next to the target; on success it replaces the target with
  one ``os.replace`` (readers see the old file or the new one, never a mix); on error it is removed
  and the target is untouched.
* :func:`atomic_write_bytes`, :func:`atomic_write_text`: the bytes and text cases of the above.
* :func:`durable_write`: a file written in place (inside a folder that is published later) and
  fsynced when complete; on error the half-written file is removed.
* :func:`replace_dir`: a folder staged beside its target (``<target>.partial-<pid>``), fsynced and
  swapped into place (the old one moved aside, then deleted); on error the staging folder is removed
  and the target is untouched. :func:`swap_dir` is its last step, for a folder staged elsewhere.
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
import shutil
import uuid
from typing import IO, Iterable, Iterator, List, Optional, Sequence, Tuple

from megatron_tokenformer.errors import TokenformerError

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "durable_write", "staging_path", "swap_dir",
           "replace_dir", "fsync_file", "fsync_dir", "fsync_tree", "OverlapError", "overlap", "check_outputs_apart",
           "tmp_name", "pid_alive", "remove_stale_temporaries"]


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


def atomic_write_bytes(path: str, data: bytes, fsync: bool = True) -> None:
    """Replace ``path`` by ``data`` atomically (durably with ``fsync``: the file, then its folder)."""
    with atomic_path(path, fsync=fsync) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path: str, text: str, fsync: bool = True) -> None:
    """Replace ``path`` by ``text`` (UTF-8) atomically (durably with ``fsync``)."""
    atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


@contextlib.contextmanager
def durable_write(path: str, mode: str = "wb", fsync: bool = True) -> Iterator[IO]:
    """Open ``path`` for writing in place and yield the file; on a clean exit it is flushed and (with
    ``fsync``) fsynced before it is closed. On an error the half-written file is removed.

    For files inside a folder that is published as a whole later (a ``.partial`` step folder, a
    staging folder of :func:`replace_dir`): the folder's rename is the atomic step, not the file's.
    """
    path = os.fspath(path)
    try:
        with open(path, mode) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
    except BaseException:
        try:
            os.remove(path)
        except OSError:
            pass
        raise


# --------------------------------------------------------------------------- folders
def staging_path(path: str) -> str:
    """``<path>.partial-<pid>``: the folder :func:`replace_dir` builds ``path`` in (absolute)."""
    return f"{os.path.abspath(os.fspath(path))}.partial-{os.getpid()}"


def swap_dir(staging: str, path: str, fsync: bool = True, aside: Optional[str] = None,
             carry: Sequence[str] = ()) -> None:
    """Put the complete folder ``staging`` in place of ``path`` (absent, empty or not).

    ``fsync``: fsync every file and folder of ``staging`` first (the renames are made durable either
    way). ``carry``: files moved into ``staging`` just before the swap (a held lock file, which
    follows its inode). An existing ``path`` is renamed to ``aside`` (default ``<path>.old-<pid>``; an
    older folder of that name is deleted first), ``staging`` renamed to ``path``, the parent fsynced,
    and only then ``aside`` deleted: a crash leaves the old folder or the new one complete under
    ``path`` (or, between the two renames, the old one under ``aside``). When the second rename fails
    the old folder and the carried files go back, and the error is raised.
    """
    staging, path = os.path.abspath(os.fspath(staging)), os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    if fsync:
        fsync_tree(staging)
    moved = []
    try:
        for item in carry:
            dest = os.path.join(staging, os.path.basename(item))
            os.rename(item, dest)
            moved.append((item, dest))
        if os.path.lexists(path):
            aside = aside or f"{path}.old-{os.getpid()}"
            if os.path.exists(aside):
                shutil.rmtree(aside)
            os.replace(path, aside)
            try:
                os.replace(staging, path)
            except OSError:
                os.replace(aside, path)
                raise
            fsync_dir(parent)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(staging, path)
    except BaseException:
        for item, dest in reversed(moved):
            try:
                os.rename(dest, item)
            except OSError:
                pass
        raise
    fsync_dir(parent)


@contextlib.contextmanager
def replace_dir(path: str, fsync: bool = True, carry: Sequence[str] = ()) -> Iterator[str]:
    """Yield an empty staging folder (:func:`staging_path`; one left by an earlier attempt of this pid
    is deleted); fill it, and on leaving it replaces ``path`` (:func:`swap_dir`, ``fsync`` and
    ``carry`` as there). On an error -- in the block or in the swap -- the staging folder is removed,
    ``path`` is untouched and the error is raised.
    """
    path = os.path.abspath(os.fspath(path))
    staging = staging_path(path)
    if os.path.lexists(staging):
        shutil.rmtree(staging)
    try:
        os.makedirs(staging)
        yield staging
        swap_dir(staging, path, fsync=fsync, carry=carry)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


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
