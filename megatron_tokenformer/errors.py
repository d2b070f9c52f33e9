"""The package's one error model: every error it raises for a failure it can name derives from
:class:`TokenformerError`, which carries the exit code the process ends with and who prints its line.

=========================  ====  ====================================================================
error                      exit  meaning
=========================  ====  ====================================================================
``TokenformerError``       2     bad input: a flag, a file, a checkpoint that cannot be used (default)
``exit_code = EXIT_FAILED`` 1    the run was fine to start but failed (a save, the numerics)
=========================  ====  ====================================================================

``every_rank_prints``: whether each rank prints the line when a run ends on it (the ranks hold the same
agreed line: a rank's log may be all one sees), or only global rank 0 (every rank raised the same error
from the same agreed state). ``training/supervision/failures.run`` applies both; ``cli.run_tool`` the exit
code. Each class also derives from the builtin it always was (``ValueError`` or ``RuntimeError``), so
``except ValueError`` still catches it.
"""

from __future__ import annotations

__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILED", "TokenformerError"]

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


class TokenformerError(Exception):
    """A failure the package can name in one line (the message); ends the process with ``exit_code``."""

    exit_code: int = EXIT_BAD_INPUT
    every_rank_prints: bool = True
