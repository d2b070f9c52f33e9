"""How a run ends on a failure it can name: one line on stderr, a non-zero exit, on every rank.

=====================================  ====  ==============================================
failure                                exit  who prints the line
=====================================  ====  ==============================================
``--save`` locked / owned / unwritable  2    rank 0 (every rank agreed on it)
truncated or unreadable checkpoint      2    rank 0 (every rank agreed on it)
a batch id outside the vocabulary       2    every rank, the same line (agreed)
a save failed (full disk, ...)          1    every rank, the same line (agreed)
NaN/Inf loss or gradient, fp16 skips    1    rank 0 (every rank sees the same values)
fp16 overflow at --min-loss-scale       1    rank 0 (DeepSpeed's error, as one line)
a collective timed out / a peer died    1    every surviving rank, naming the silent rank
=====================================  ====  ==============================================

:func:`run` wraps the entry point's ``main``. Every error of the package derives from
:class:`megatron_tokenformer.errors.TokenformerError`, which carries its exit code and whether every rank
prints its line (``every_rank_prints``); the two failures that are not the package's own (a collective
that failed, DeepSpeed's fp16 scale floor) are recognised here. Other exceptions keep their traceback
(a bug).
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import Callable, NoReturn, Optional, Sequence

from megatron_tokenformer.cli import print_error
from megatron_tokenformer.errors import EXIT_FAILED, TokenformerError

__all__ = ["run", "destroy_process_group_quietly", "exit_code_of", "end_process"]


def _rank() -> int:
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:
        pass
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


def run(main: Callable[[Optional[Sequence[str]]], int], argv=None, prog: str = "pretrain_tokenformer.py") -> int:
    """``main(argv)``, with the failures of the module docstring turned into one line and an exit code.

    An exit through ``SystemExit`` after the process group exists destroys the group first: left to the
    interpreter's teardown, gloo's threads are sometimes destroyed while still joinable and the process
    aborts after its error line ("terminate called without an active exception", exit -6; seen in about
    1 of 16 refused starts on a held ``--save``).
    """
    try:
        return _run(main, argv, prog)
    except SystemExit:
        destroy_process_group_quietly()
        raise


def destroy_process_group_quietly() -> None:
    """Destroy the default process group (and every subgroup) if one exists; never raises."""
    dist = sys.modules.get("torch.distributed")
    if dist is None:  # torch never imported: nothing to tear down
        return
    try:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - exiting anyway; the error line is already out
        pass


def exit_code_of(code) -> int:
    """The exit status ``sys.exit(code)`` gives: None -> 0, an int as is, anything else (a message, which is
    printed to stderr here as the interpreter would) -> 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _finalize_mpi() -> None:
    """``MPI_Finalize`` where mpi4py initialised MPI (``mpirun`` ranks: launch.py reads the rank from mpi4py).
    mpi4py finalizes at the interpreter's C-level exit, which ``os._exit`` skips, and ``mpirun`` reports a
    rank that ends without it as an abnormal termination (exit 1)."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None:
        return
    try:
        if mpi.Is_initialized() and not mpi.Is_finalized():
            mpi.Finalize()
    except Exception:  # noqa: BLE001 - exiting anyway
        pass


def end_process(code) -> NoReturn:
    """End the entry point's process with exit status ``exit_code_of(code)`` after what a normal exit does
    that matters -- the process groups destroyed, other threads that are not daemons joined, Python's exit
    handlers run (the ``--save`` lock file, data-loader workers, ``logging``), MPI finalized where mpi4py
    initialised it, stdout and stderr flushed -- but without the interpreter's teardown of the torch and
    gloo objects still alive: that teardown destroys them in no defined order, and a gloo thread destroyed
    while still joinable aborts a run that has finished and saved ("terminate called without an active
    exception", exit -6 after "done"; seen under srun, where Slurm then marks the job FAILED and an
    ``afterok`` stage never starts)."""
    status = exit_code_of(code)
    try:
        destroy_process_group_quietly()
        me = threading.current_thread()
        for thread in threading.enumerate():
            if thread is not me and not thread.daemon and thread is not threading.main_thread():
                thread.join()
        atexit._run_exitfuncs()
        _finalize_mpi()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed channel: nothing more can be said
                pass
        os._exit(status)


def _run(main, argv, prog: str) -> int:
    try:
        return main(argv)
    except TokenformerError as exc:  # the error says its exit code and whether every rank prints it
        if exc.every_rank_prints or _rank() == 0:
            print_error(prog, str(exc))
        raise SystemExit(exc.exit_code)
    except RuntimeError as exc:
        from megatron_tokenformer.training.supervision import collective_timeout
        if not collective_timeout.is_collective_failure(exc):
            raise
        try:
            message = collective_timeout.describe_failure(exc)
        except Exception:  # noqa: BLE001 - the diagnosis itself failed: still one line
            message = f"rank {_rank()}: a collective failed ({str(exc).splitlines()[0] if str(exc) else exc!r})"
        print_error(prog, message)
        sys.stdout.flush()
        os._exit(EXIT_FAILED)  # the process group is broken: no shutdown hooks that might wait on it
    except Exception as exc:  # noqa: BLE001 - DeepSpeed raises a bare Exception at the fp16 scale floor
        if _MIN_SCALE_TEXT not in str(exc):
            raise
        if _rank() == 0:
            print_error(prog, "fp16: the gradients overflow at --min-loss-scale, the loss scale cannot decrease "
                              f"further (DeepSpeed: {str(exc).strip()})")
        raise SystemExit(EXIT_FAILED)


_MIN_SCALE_TEXT = "Current loss scale already at minimum"
