"""``python -m tests.helpers.warm_launch --nproc-per-node N SCRIPT ARGS...``: torchrun's one-host static
launch for the test suite, with the imports paid once instead of once per rank.

A rank of a tiny test run of pretrain_tokenformer.py spends most of its CPU time importing: torch,
DeepSpeed, and ``torch._dynamo`` (torch's optimizers import it when they are built) -- about 3.5 of its
~5 CPU-seconds on this 2-core machine, where the suite's CPU time is the limit. This launcher imports
them once, then forks the ranks. Each rank gets the variables torchrun sets on one host (RANK,
LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR, MASTER_PORT: the package sees an
``env`` launch, as under torchrun) and runs SCRIPT as ``__main__`` with ``sys.argv = [SCRIPT, *ARGS]``.

What it keeps from torchrun (what the tests that use it rely on):

* the ranks are this process's children, in its process group: a test that kills the group
  (train_runs.communicate_or_kill) kills them;
* SIGINT, SIGTERM, SIGUSR1 and SIGHUP sent to the launcher are forwarded to every rank;
* when a rank exits non-zero the others are sent SIGTERM, and SIGKILL after ``GRACE_S``; the launcher
  exits 1 if any rank failed (torchrun's status), 0 otherwise; it reports each failed rank in one line.

The subject of the tests that use it is not the launcher (layout equivalence, checkpoints); the
launchers themselves are tested with the real ones (tests/unit/test_launch.py, tests/integration/
multinode, tests/integration/operations). Forking is safe here because importing these modules starts
no thread (checked before the first fork: a thread would be copied half-way)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from typing import Dict, List, Optional

GRACE_S = 30.0
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)

# what every rank of pretrain_tokenformer.py imports (the costly part first)
PRELOAD = ("torch", "torch._dynamo", "deepspeed", "deepspeed.ops", "deepspeed.comm",
           "megatron_tokenformer.arguments", "megatron_tokenformer.parallel_state",
           "megatron_tokenformer.training.engine", "megatron_tokenformer.training.loop",
           "megatron_tokenformer.checkpointing.io")


def preload() -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    threads = threading.enumerate()
    tasks = os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ["1"]
    if len(threads) != 1 or len(tasks) != 1:
        raise SystemExit(f"warm_launch: importing {', '.join(PRELOAD)} started threads "
                         f"({[t.name for t in threads]}, {len(tasks)} tasks): forking would copy them half-way")


def command(nproc: int, script: str, args: List[str]) -> List[str]:
    """The argv that launches ``script args`` on ``nproc`` ranks."""
    return [sys.executable, "-m", "tests.helpers.warm_launch", "--nproc-per-node", str(nproc), script] + list(args)


def _run_rank(rank: int, nproc: int, port: int, script: str, args: List[str]) -> None:
    """In the forked child: become rank ``rank`` and run the script; never returns."""
    for sig in FORWARDED:
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                      GROUP_RANK="0", GROUP_WORLD_SIZE="1", ROLE_RANK=str(rank), ROLE_WORLD_SIZE=str(nproc),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    sys.argv = [script] + list(args)
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    import runpy

    runpy.run_path(script, run_name="__main__")
    raise SystemExit(0)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="warm_launch", description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc-per-node", type=int, required=True)
    p.add_argument("script")
    p.add_argument("args", nargs=argparse.REMAINDER)
    opts = p.parse_args(argv)
    preload()
    from megatron_tokenformer.launch import find_free_port

    port = find_free_port()
    children: Dict[int, int] = {}  # pid -> rank
    received: List[int] = []

    def forward(signum, _frame):
        received.append(signum)
        for pid in list(children):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    for sig in FORWARDED:
        signal.signal(sig, forward)
    sys.stdout.flush()
    sys.stderr.flush()
    for rank in range(opts.nproc_per_node):
        pid = os.fork()
        if pid == 0:
            _run_rank(rank, opts.nproc_per_node, port, opts.script, opts.args)
        children[pid] = rank

    failed: Dict[int, int] = {}   # rank -> exit code (negative: signal)
    kill_at = None
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            if kill_at is not None and time.time() >= kill_at:
                for other in list(children):
                    try:
                        os.kill(other, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                kill_at = float("inf")
            time.sleep(0.05)
            continue
        rank = children.pop(pid, None)
        if rank is None:
            continue
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            failed[rank] = code
            if kill_at is None:  # the first failure: end the others, as torchrun does
                kill_at = time.time() + GRACE_S
                for other in list(children):
                    try:
                        os.kill(other, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
    for rank, code in sorted(failed.items()):
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        print(f"warm_launch: rank {rank} failed ({how})", file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
