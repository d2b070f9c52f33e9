"""The command lines' one runner: a failure ends in ONE line ``<prog>: error: <message>`` on stderr and an
exit code, never a traceback.

Used by ``tools/*.py`` (:func:`run_tool`) and the training entry point (``training/supervision/failures.py``
prints through :func:`print_error`). An error of the package (:class:`~megatron_tokenformer.errors.TokenformerError`)
carries its own exit code; a tool names the exit code of the other errors it expects (``OSError`` of a
file, ``ValueError`` of a parser) in ``failures``, checked first, in order.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence, Tuple, Type, Union

from megatron_tokenformer.errors import EXIT_BAD_INPUT, TokenformerError

__all__ = ["OneLineParser", "ToolError", "print_error", "error_message", "run_tool"]

ErrorTypes = Union[Type[BaseException], Tuple[Type[BaseException], ...]]


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error prints one line ``<tool>: error: ...`` and exits 2."""

    def error(self, message):  # noqa: D401 - argparse API
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


class ToolError(TokenformerError):
    """A tool's own refusal found after parsing (a flag value, an existing output); exit 2."""


def error_message(exc: BaseException) -> str:
    """The message of ``exc``: its text (a ``KeyError``'s key without quotes), or its type name when empty."""
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    return str(text).strip() or type(exc).__name__


def print_error(prog: str, message: str) -> None:
    """``<prog>: error: <message>`` as one line on stderr (line breaks of the message become spaces)."""
    text = " ".join(str(message).split("\n")).strip()
    sys.stdout.flush()
    sys.stderr.write(f"{prog}: error: {text}\n")
    sys.stderr.flush()


def run_tool(prog: str, main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None,
             failures: Sequence[Tuple[ErrorTypes, int]] = (), quiet: bool = False) -> int:
    """``main(argv)``; an error listed in ``failures`` (``[(types, exit code)]``, the first match wins) or any
    :class:`TokenformerError` (its ``exit_code``) ends in one line and returns its code. ``quiet``: return the
    code without printing (the ranks of a multi-process tool other than rank 0). Anything else propagates
    (a bug keeps its traceback)."""
    try:
        return main(argv)
    except Exception as exc:  # noqa: BLE001 - filtered just below; the rest is re-raised
        code = next((c for types, c in failures if isinstance(exc, types)), None)
        if code is None and isinstance(exc, TokenformerError):
            code = exc.exit_code
        if code is None:
            raise
        if not quiet:
            print_error(prog, error_message(exc))
        return code
