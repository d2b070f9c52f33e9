"""Shared by the interop tools: an argument parser whose usage errors are ONE line (exit 2), and
the rule that turns a bad-input exception into one line and exit 2."""

from __future__ import annotations

import argparse
import sys


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error prints one line ``<tool>: error: ...`` and exits 2."""

    def error(self, message):  # noqa: D401 - argparse API
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def fail(prog: str, exc: BaseException) -> int:
    """Print ``<tool>: error: <first line of exc>`` and return 2."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    print(f"{prog}: error: {text}", file=sys.stderr)
    return 2
