"""training/collective_timeout.py: a stopped rank makes the others fail within the timeout, naming it.

Two bare gloo processes (no model): rank 1 stops itself (SIGSTOP); rank 0's all-reduce on a group
created after set_default_timeout must fail within that timeout, and the diagnosis must name rank 1.
"""

import subprocess
import sys

import psutil
import pytest

from megatron_tokenformer.training import collective_timeout
from tests.helpers import train_runs

WORKER = r"""
import os, signal, sys, time
import torch, torch.distributed as dist
from megatron_tokenformer.training import collective_timeout
collective_timeout.set_default_timeout(float(sys.argv[1]))
dist.init_process_group("gloo")
group = dist.new_group(ranks=[0, 1])          # created like parallel_state's groups: no explicit timeout
collective_timeout.create_diagnosis_group()
dist.all_reduce(torch.ones(1), group=group)   # both alive: fine
if dist.get_rank() == 1:
    print("stopping", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
time.sleep(1)
start = time.time()
try:
    dist.all_reduce(torch.ones(1), group=group)
    print("no error", flush=True)
except RuntimeError as exc:
    assert collective_timeout.is_collective_failure(exc), exc
    print("failed after %.1f s" % (time.time() - start), flush=True)
    print("line:", collective_timeout.describe_failure(exc), flush=True)
os._exit(0)
"""


def test_silent_ranks_parsing():
    assert collective_timeout._silent_ranks("[Rank 0]: Ranks 1, 3 failed to pass monitoredBarrier in 5000 ms") == [1, 3]
    assert collective_timeout._silent_ranks("Rank 2 failed to pass monitoredBarrier in 100 ms") == [2]
    assert collective_timeout._silent_ranks("Rank 1 successfully reached monitoredBarrier, but received errors while "
                                            "waiting for send/recv from rank 0.") == [0]
    assert collective_timeout._silent_ranks("something else") == []


@pytest.mark.slow
def test_stopped_rank_is_named_within_the_timeout(tmp_path):
    port = str(train_runs.free_port())
    procs = []
    try:
        for rank in (0, 1):
            env = train_runs.env({"RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                  "MASTER_PORT": port})
            procs.append(subprocess.Popen([sys.executable, "-c", WORKER, "0.1"], env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        assert procs[1].stdout.readline().strip() == "stopping"
        out, _ = procs[0].communicate(timeout=120)
        assert procs[0].returncode == 0, out
        took = float(out.split("failed after ")[1].split(" s")[0])
        assert 5.0 <= took <= 6.0 + 10.0, out         # the 6 s bound, not torch's default of 30 minutes
        line = [l for l in out.splitlines() if l.startswith("line: ")][0]
        assert line.startswith("line: rank 0: a collective failed (") and "rank 1 stopped answering" in line, line
        assert "--distributed-timeout-minutes 0.1" in line
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert not any(psutil.pid_exists(p.pid) for p in procs)
