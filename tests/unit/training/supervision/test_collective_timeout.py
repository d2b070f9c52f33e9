"""training/supervision/collective_timeout.py: a stopped rank makes the others fail within the timeout, naming it.

Two bare gloo processes (no model): rank 1 stops itself (SIGSTOP); rank 0's all-reduce on a group
created after set_default_timeout must fail within that timeout, and the diagnosis must name rank 1.
"""

import subprocess
import sys

import psutil
import pytest

from megatron_tokenformer.training.supervision import collective_timeout
from tests.helpers import train_runs

WORKER = r"""
import os, signal, sys, time
import torch, torch.distributed as dist
from megatron_tokenformer.training.supervision import collective_timeout
collective_timeout.set_default_timeout(float(sys.argv[1]))
dist.init_process_group("gloo")
group = dist.new_group(ranks=[0, 1])          # created like parallel_state's groups: no explicit timeout
collective_timeout.create_diagnosis_group()
dist.all_reduce(torch.ones(1), group=group)   # both alive: fine
if dist.get_rank() == 1:
    print("stopping", flush=True)
    os.kill(os.getpid(), getattr(signal, sys.argv[2] if len(sys.argv) > 2 else "SIGSTOP"))
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
def test_killed_rank_is_named_with_its_exit_status():
    """Issue 20 item 7: rank 1 SIGKILLed; rank 0's line names rank 1, its pid on this host and how it ended
    (its parent, here the test, has not collected it yet: the status is readable from /proc)."""
    port = str(train_runs.free_port())
    procs = []
    try:
        for rank in (0, 1):
            env = train_runs.env({"RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                  "MASTER_PORT": port})
            procs.append(subprocess.Popen([sys.executable, "-c", WORKER, "0.5", "SIGKILL"], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        assert procs[1].stdout.readline().strip() == "stopping"
        out, _ = procs[0].communicate(timeout=180)
        assert procs[0].returncode == 0, out
        line = [l for l in out.splitlines() if l.startswith("line: ")][0]
        assert f"rank 1 = pid {procs[1].pid} on this host, ended: killed by SIGKILL; rank 1 stopped answering " \
               f"or ended (collectives are bounded by --distributed-timeout-minutes 0.5)" in line, line
        took = float(out.split("failed after ")[1].split(" s")[0])
        assert took < 30.0, out  # a closed connection is noticed at once, not after the timeout
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert not any(psutil.pid_exists(p.pid) for p in procs)


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


# --- what counts as a failed collective ------------------------------------------------------------
COLLECTIVE_FAILURES = [
    "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Timed out waiting 6000ms for recv operation to complete",
    "[../third_party/gloo/gloo/transport/tcp/pair.cc:598] Connection closed by peer [127.0.0.1]:41523",
    "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Application timeout caused pair closure",
    "Connection reset by peer",
    "[Rank 0]: Ranks 1 failed to pass monitoredBarrier in 5000 ms",
    "[PG ID 0 PG GUID 0(default_pg) Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=7, "
    "OpType=ALLREDUCE, NumelIn=1, NumelOut=1, Timeout(ms)=30000) ran for 30002 milliseconds before timing out.",
    "NCCL communicator was aborted on rank 3.",
    "NCCL error in: ../torch/csrc/distributed/c10d/NCCLUtils.cpp:77, remote process exited or there was a network "
    "error, NCCL version 2.27.3\nncclRemoteError: A call failed possibly due to a network error or a remote process "
    "exiting prematurely.",
    "[../third_party/gloo/gloo/transport/tcp/pair.cc:446] some new gloo wording",
    "Socket Timeout",
]
NOT_COLLECTIVE_FAILURES = [
    "NCCL is not available in this build of torch",
    "CUDA error: an illegal memory access was encountered (the NCCL kernels may also report it)",
    "Distributed package doesn't have NCCL built in",
    "socket.gaierror while reading the dataset URL",
    "cannot open tokenizer file: the peer review folder is missing",
    "the gloo-style config key 'timeout' is not supported",
]


@pytest.mark.parametrize("text", COLLECTIVE_FAILURES)
def test_collective_failure_texts(text):
    assert collective_timeout.is_collective_failure(RuntimeError(text))


@pytest.mark.parametrize("text", NOT_COLLECTIVE_FAILURES)
def test_errors_that_only_mention_nccl_or_sockets_are_not_collective_failures(text):
    assert not collective_timeout.is_collective_failure(RuntimeError(text))


def test_torch_distributed_errors_are_collective_failures():
    import torch.distributed as dist
    assert collective_timeout.is_collective_failure(dist.DistBackendError("anything"))


# --- who is blamed ---------------------------------------------------------------------------------
def test_blame_names_ranks_only_where_it_can_be_right():
    # rank 0 of 8 sees ranks 3 and 5 missing: named
    assert collective_timeout.blame([3, 5], 0, 8, 15) == "ranks 3, 5 stopped answering or ended"
    assert collective_timeout.blame([1], 0, 2, 15) == "rank 1 stopped answering or ended"  # two ranks: the other
    # a lone failing rank leading the barrier sees every other rank missing: not blamed on all of them
    line = collective_timeout.blame(list(range(1, 8)), 0, 8, 15)
    assert line == ("none of the other 7 ranks answered within 15 s (they all stopped, or this rank alone is out "
                    "of step with them)")
    assert collective_timeout.blame([], 4, 8, 15) == "another rank stopped answering or ended"
    assert collective_timeout.blame([0], 4, 8, 15) == "rank 0 stopped answering or ended"  # (a non-leader's view)
    assert collective_timeout.blame([4], 4, 8, 15) == "another rank stopped answering or ended"  # never itself


def test_diagnosis_wait_bound():
    from datetime import timedelta
    assert collective_timeout.diagnosis_wait_seconds(timedelta(minutes=0.5)) == 15.0
    assert collective_timeout.diagnosis_wait_seconds(timedelta(minutes=0.1)) == 5.0
    assert collective_timeout.diagnosis_wait_seconds(timedelta(minutes=10)) == 30.0
    assert collective_timeout.diagnosis_wait_seconds(None) == 30.0


# --- the NCCL environment --------------------------------------------------------------------------
TORCH_NCCL_HEADER = "include/torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp"


def test_nccl_environment_names_exist_in_the_installed_torch(tmp_path):
    """Every variable we set is one the installed torch reads (its C++ headers ship with the wheel)."""
    import os

    import torch
    root = os.path.dirname(torch.__file__)
    texts = ""
    for rel in (TORCH_NCCL_HEADER, "include/torch/csrc/distributed/c10d/FlightRecorder.hpp",
                "include/torch/csrc/distributed/c10d/ProcessGroupGloo.hpp"):
        with open(os.path.join(root, rel)) as f:
            texts += f.read()
    with open(os.path.join(root, "lib", "libtorch_cpu.so"), "rb") as f:
        library = f.read()
    env = collective_timeout.nccl_environment("nccl", str(tmp_path), {})
    assert set(env) == {"TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_NCCL_DUMP_ON_TIMEOUT",
                        "TORCH_NCCL_ENABLE_MONITORING", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE", "TORCH_FR_DUMP_TEMP_FILE"}
    for name in env:
        assert f'"{name}"' in texts or name.encode() in library, name
    assert "TORCH_GLOO_LAZY_INIT" in texts
    # CleanUpOnly (2) is the mode that aborts the communicators without tearing the process down
    assert "CleanUpOnly = 2" in texts and env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "2"
    assert env["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] == str(tmp_path / "nccl_flight_recorder" / "rank_")


def test_nccl_environment_keeps_the_users_settings_and_leaves_gloo_alone(tmp_path):
    assert collective_timeout.nccl_environment("gloo", str(tmp_path), {}) == {}
    user = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3", "TORCH_NCCL_TRACE_BUFFER_SIZE": "0"}
    env = collective_timeout.nccl_environment("nccl", None, user)
    assert env == {"TORCH_NCCL_DUMP_ON_TIMEOUT": "1", "TORCH_NCCL_ENABLE_MONITORING": "1"}
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in collective_timeout.nccl_environment(
        "nccl", None, {"NCCL_ASYNC_ERROR_HANDLING": "1"})  # the older name counts as the user's choice
    environ = {}
    added = collective_timeout.apply_nccl_environment("nccl", str(tmp_path / "run"), environ)
    assert environ == added and (tmp_path / "run" / "nccl_flight_recorder").is_dir()


# --- the diagnosis group connects lazily -----------------------------------------------------------
from tests.helpers import dist_pool  # noqa: E402

pool4 = dist_pool.pool_fixture(4)


def _tcp_connections():
    return len([c for c in psutil.Process().net_connections(kind="tcp") if c.status == psutil.CONN_ESTABLISHED])


def check_diagnosis_group_is_a_star(rank, world):
    """Creating the diagnosis group opens rank 0's connection to each other rank only (a full-mesh gloo
    group, created the plain way, opens world - 1 on every rank); its monitored barrier works."""
    import time
    from datetime import timedelta

    import torch.distributed as dist

    from megatron_tokenformer.tensor_parallel.mappings import monitored_barrier
    before = _tcp_connections()
    group = collective_timeout.create_diagnosis_group()
    dist.barrier()
    time.sleep(0.5)
    star = _tcp_connections() - before
    before = _tcp_connections()
    full = dist.new_group(backend="gloo")  # the reference: what the group cost before
    dist.barrier()
    time.sleep(0.5)
    mesh = _tcp_connections() - before
    monitored_barrier(group, timedelta(seconds=60), wait_all_ranks=True)
    dist.destroy_process_group(full)
    return star, mesh


def test_diagnosis_group_is_not_a_full_mesh(pool4):
    results = pool4.run(check_diagnosis_group_is_a_star)
    world = len(results)
    star = [s for s, _ in results]
    mesh = [m for _, m in results]
    assert all(m >= world - 1 for m in mesh), results  # full mesh: every rank connects to every other
    # star: rank 0 to each other rank, nothing between the others
    assert star[0] == mesh[0] and all(s * (world - 1) == m for s, m in zip(star[1:], mesh[1:])), results


def test_diagnosis_store_operations_are_bounded_and_stop_after_one_failure():
    """A link cut leaves the rendezvous store silent: each store operation of a diagnosis is bounded by what
    is left of the diagnosis wait (not the store's own minutes-long timeout), and after one failure none is
    tried, so a cut-off rank ends instead of waiting on its store (tests/integration/multinode, link cut)."""
    import time as _time
    from datetime import timedelta as _td

    import torch.distributed as dist

    from megatron_tokenformer.launch import find_free_port
    from megatron_tokenformer.training.supervision.collective_timeout import _DeadlineStore
    port = find_free_port()
    store = dist.TCPStore("127.0.0.1", port, 1, True, timeout=_td(seconds=120))
    bounded = _DeadlineStore(store, 1.0)
    start = _time.monotonic()
    with pytest.raises(Exception):
        bounded.get("a key nobody sets")        # a missing key: TCPStore waits for it up to its timeout
    first = _time.monotonic() - start
    assert first < 60, first                    # the store's own 120 s timeout was not waited out
    start = _time.monotonic()
    with pytest.raises(RuntimeError, match="did not answer in time"):
        bounded.set("k", "v")                   # after a failure: refused at once, nothing waits
    assert _time.monotonic() - start < 1.0
    other = dist.TCPStore("127.0.0.1", port, 1, False, timeout=_td(seconds=30))
    other.set("k", "v")                         # the store itself is untouched (a second client: the
    assert other.get("k") == b"v"               # first is still inside the abandoned get)
