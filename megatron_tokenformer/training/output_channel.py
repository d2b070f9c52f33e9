"""A rank never dies because a log line could not be written: a lost stdout/stderr becomes an exit request.

A rank's output goes wherever its launcher put it: a pipe to ``pdsh``/``ssh`` (``deepspeed --hostfile``),
to torchrun, to ``tee``, or a terminal. When that channel goes away -- the ssh session that carries a
remote host's output is dropped, the runner that read the pipe was killed, ``tee`` ended, the terminal
hung up -- the next ``print`` fails (``EPIPE``; ``EIO`` on a hung-up terminal). Python ignores SIGPIPE,
so the failure is a ``BrokenPipeError`` raised by the log line, and a rank used to die of it, unsaved,
in the middle of its iteration (its peers then failed in the next collective). That is how SIGTERM to
the ``deepspeed --hostfile`` runner lost every rank's work: the runner kills ``pdsh`` (and with it the
ssh sessions) before the per-host launchers pass SIGTERM on to the ranks.

:func:`install` (called first thing on every rank) wraps ``sys.stdout`` and ``sys.stderr``. A write or
flush that fails with any ``OSError``:

* is dropped, and the stream's file descriptor is pointed at ``/dev/null`` (so later writes, also those
  of C++ code to the same descriptor, succeed and go nowhere);
* records :func:`reason` ("the output channel closed (stdout: Broken pipe)"), which the training loop
  treats like SIGTERM: every rank agrees, finishes the iteration, saves and exits 0. A run that can no
  longer report anything is not left training blind, and a dropped ssh session ends the job cleanly.

The wrapper forwards everything else (``fileno``, ``isatty``, ``encoding``, ...) to the real stream.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Optional

__all__ = ["install", "uninstall", "reason", "GuardedStream"]

_reason: Optional[str] = None
_lock = threading.Lock()


def reason() -> Optional[str]:
    """Why this rank should stop (its stdout or stderr could not be written), or None."""
    return _reason


def _record(name: str, exc: OSError) -> None:
    global _reason
    with _lock:
        if _reason is None:
            what = os.strerror(exc.errno) if exc.errno else (str(exc) or type(exc).__name__)
            _reason = f"the output channel closed ({name}: {what})"


class GuardedStream:
    """``stream`` whose ``write``/``flush``/``writelines`` never raise ``OSError`` (see the module docstring)."""

    def __init__(self, stream, name: str):
        self._stream = stream
        self._name = name
        self._closed_channel = False

    @property
    def wrapped(self):
        return self._stream

    def _divert(self, exc: OSError) -> None:
        """Record the failure and point the descriptor at /dev/null (once)."""
        _record(self._name, exc)
        if self._closed_channel:
            return
        self._closed_channel = True
        try:
            fd = self._stream.fileno()
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, fd)
            finally:
                os.close(devnull)
        except (OSError, ValueError, AttributeError):  # no descriptor (a StringIO, a closed stream)
            pass
        # what the stream still buffers was meant for the closed channel: let it go to /dev/null now
        try:
            self._stream.flush()
        except (OSError, ValueError):
            pass

    def write(self, text):
        try:
            return self._stream.write(text)
        except OSError as exc:
            self._divert(exc)
            return len(text)
        except ValueError:  # closed stream (interpreter shutdown): nothing can be written any more
            return len(text)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        try:
            self._stream.flush()
        except OSError as exc:
            self._divert(exc)
        except ValueError:
            pass

    def __getattr__(self, item):
        return getattr(self._stream, item)


def install() -> None:
    """Guard ``sys.stdout`` and ``sys.stderr`` of this process (idempotent)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, GuardedStream):
            setattr(sys, name, GuardedStream(stream, name))


def uninstall() -> None:
    """Put the real streams back and forget the reason (tests)."""
    global _reason
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if isinstance(stream, GuardedStream):
            setattr(sys, name, stream.wrapped)
    _reason = None

