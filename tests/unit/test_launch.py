"""Rank discovery (megatron_tokenformer/launch.py) and every supported launcher starting a real run of
pretrain_tokenformer.py: deepspeed (--num_gpus and --hostfile), torchrun, mpirun, srun, and the CPU
Slurm batch script under sbatch on the local cluster from ../shared/slurm (skipped, with the
reason, where that cluster cannot be started).

Every launcher runs the same tiny model and global batch, so each must reproduce the single-process
run's losses -- a wrong rank, world size or data-parallel slice would change them (or hang, which the
timeouts turn into failures)."""

import os
import shutil
import socket
import subprocess
import sys

import pytest

from megatron_tokenformer import launch
from tests.helpers import train_runs

ITERS = 3
ARGS = train_runs.TINY_MODEL + ["--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", str(ITERS),
                                "--lr", "1e-3", "--mock-data", "--vocab-size", "100", "--log-interval", "1",
                                "--eval-iters", "0", "--seed", "5"]
SLURM_DIR = os.path.join(os.path.dirname(train_runs.ROOT), "shared", "slurm")


# ----------------------------------------------------------------------------- unit: discovery


@pytest.mark.parametrize("nodelist, expected", [
    ("vm", ["vm"]),
    ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
    ("a[1-2],b,c[9-10]", ["a1", "a2", "b", "c9", "c10"]),
    ("rack[1-2]-n[3-4]", ["rack1-n3", "rack1-n4", "rack2-n3", "rack2-n4"]),
    ("node[008-010]", ["node008", "node009", "node010"]),
])
def test_expand_nodelist(nodelist, expected):
    assert launch.expand_nodelist(nodelist) == expected


def test_discover_from_torchrun_or_deepspeed_variables():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "6000",
           "LOCAL_WORLD_SIZE": "2"}
    d = launch.discover(env)
    assert (d.rank, d.world_size, d.local_rank, d.master_addr, d.master_port, d.launcher, d.local_world_size) == \
        (3, 8, 1, "10.0.0.5", 6000, "env", 2)


def test_discover_inside_an_srun_step():
    env = {"SLURM_PROCID": "5", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "16", "SLURM_NTASKS": "16",
           "SLURM_LOCALID": "5", "SLURM_NODEID": "0", "SLURM_STEP_NODELIST": "gpu[12-13]",
           "SLURM_JOB_ID": "4242", "SLURM_STEP_TASKS_PER_NODE": "8(x2)"}
    d = launch.discover(env)
    assert (d.rank, d.world_size, d.local_rank, d.master_addr, d.launcher, d.local_world_size) == \
        (5, 16, 5, "gpu12", "slurm", 8)
    assert d.master_port == 15000 + (4242 * 7 + 0) % 45000
    exported = {}
    launch.export(d, exported)
    assert exported == {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "5", "MASTER_ADDR": "gpu12",
                        "MASTER_PORT": str(d.master_port)}


def test_batch_script_itself_is_a_single_process():
    """sbatch's batch step sets SLURM_PROCID/SLURM_NTASKS but is one process: not an srun step."""
    d = launch.discover({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"})
    assert (d.rank, d.world_size, d.launcher) == (0, 1, "single")


def test_bad_rank_is_refused():
    with pytest.raises(ValueError, match="rank 4 is outside world size 4"):
        launch.discover({"RANK": "4", "WORLD_SIZE": "4"})


def test_cpu_threads_shared_between_local_ranks():
    d = launch.DistributedEnv(0, 2, 0, "127.0.0.1", 1, "slurm", local_world_size=2)
    environ = {}
    threads = launch.configure_cpu_threads(d, environ)
    assert threads == max(1, len(os.sched_getaffinity(0)) // 2) and environ["OMP_NUM_THREADS"] == str(threads)
    assert launch.configure_cpu_threads(d, {"OMP_NUM_THREADS": "3"}) == 3


# The first import of torch loads its OpenMP runtime, which reads OMP_NUM_THREADS once: set later, the
# share is ignored and each rank of an srun/mpirun job spins one thread per core (a CPU job 4x slower).
_TORCH_IMPORT_SPY = """
import importlib.abc, os, sys, time
class Spy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch":
            print("OMP_NUM_THREADS at the first torch import:", os.environ.get("OMP_NUM_THREADS"), flush=True)
            os._exit(0)
sys.meta_path.insert(0, Spy())
from megatron_tokenformer.training.pretrain import main
main(sys.argv[1:], time.time())
print("torch was never imported", flush=True)
"""


def test_pretrain_shares_the_cores_before_torch_is_imported(tmp_path):
    """Rank 0 of a 2-task srun step that sets no OMP_NUM_THREADS, resuming (--load) with every flag checked
    before the process group: torch is first imported with the share of this host's cores already set."""
    environ = train_runs.env({"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                              "SLURM_NODEID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "2",
                              "SLURM_STEP_NODELIST": "localhost"})
    environ.pop("OMP_NUM_THREADS")
    argv = train_runs.TINY_MODEL + ["--micro-batch-size", "1", "--global-batch-size", "2", "--train-iters", "2",
                                    "--mock-data", "--vocab-size", "100", "--tensor-model-parallel-size", "2",
                                    "--load", str(tmp_path), "--save", str(tmp_path)]
    out = subprocess.run([sys.executable, "-c", _TORCH_IMPORT_SPY] + argv, env=environ, capture_output=True,
                         text=True, timeout=120)
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    assert out.stdout.strip().splitlines()[-1:] == [f"OMP_NUM_THREADS at the first torch import: {share}"], \
        out.stdout[-2000:] + out.stderr[-2000:]


def _mpirun():
    exe = shutil.which("mpirun")
    if exe is None:
        pytest.skip("mpirun (OpenMPI) is not installed")
    cmd = [exe, "--oversubscribe", "-np", "2"]
    if os.geteuid() == 0:
        cmd.insert(1, "--allow-run-as-root")
    return cmd


def test_mpi_discovery_through_mpi4py(tmp_path):
    code = ("import sys; from megatron_tokenformer import launch; d = launch.discover(); "
            "open(sys.argv[1] + '/rank%d' % d.rank, 'w').write("
            "' '.join(map(str, (d.rank, d.world_size, d.local_rank, d.master_addr, d.master_port, d.launcher))))")
    train_runs.check_ok(train_runs.run(_mpirun() + [sys.executable, "-c", code, str(tmp_path)], timeout=60))
    rows = [(tmp_path / f"rank{r}").read_text().split() for r in range(2)]
    assert [r[:3] for r in rows] == [["0", "2", "0"], ["1", "2", "1"]]
    assert rows[0][3:] == rows[1][3:] and rows[0][5] == "mpi"  # same master address and port


# ----------------------------------------------------------------------------- the rendezvous port
def test_ephemeral_port_range_is_read_from_the_kernel_file(tmp_path):
    f = tmp_path / "ip_local_port_range"
    f.write_text("40000\t50000\n")
    assert launch.ephemeral_port_range(str(f)) == (40000, 50000)
    assert launch.ephemeral_port_range(str(tmp_path / "missing")) == (32768, 60999)  # Linux's default


def test_free_port_is_below_the_ephemeral_range_and_bindable():
    low = launch.ephemeral_port_range()[0]
    for _ in range(20):
        port = launch.find_free_port()
        assert launch.FREE_PORT_FLOOR <= port < low
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", port))  # free (nobody listens there)


def test_free_port_skips_a_port_in_use():
    low = launch.ephemeral_port_range()[0]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        busy = launch.find_free_port()
        held.bind(("", busy))
        held.listen()
        picks = []

        class Rng:  # the busy port twice, then the ports next to it
            def randrange(self, a, b):
                assert (a, b) == (launch.FREE_PORT_FLOOR, low)
                picks.append(busy if len(picks) < 2 else a + (busy - a + len(picks) - 1) % (b - a))
                return picks[-1]

        port = launch.find_free_port(None, Rng())
        assert port != busy and port in picks[2:] and launch.FREE_PORT_FLOOR <= port < low


def test_free_port_from_the_kernel_when_the_span_below_its_range_is_small():
    port = launch.find_free_port((launch.FREE_PORT_FLOOR + 10, 60999))
    assert 1024 <= port <= 65535


# ----------------------------------------------------------------------------- launchers: real runs


@pytest.fixture(scope="module")
def reference_losses():
    out = train_runs.check_ok(train_runs.run(train_runs.warm_launch(1, ARGS), timeout=120))
    return [r["lm loss"] for r in train_runs.parse_iterations(out)]


def _check_run(out, reference, launcher, world):
    assert f"> launcher: {launcher}, world size {world} " in out, out[-3000:]
    losses = [r["lm loss"] for r in train_runs.parse_iterations(out)]
    assert losses == pytest.approx(reference, rel=1e-4)
    assert len(losses) == ITERS


pytestmark = pytest.mark.slow


def test_torchrun_four_ranks(reference_losses):
    out = train_runs.check_ok(train_runs.run(train_runs.torchrun(4, ARGS + train_runs.layout_args(2, 1)),
                                             timeout=180))
    _check_run(out, reference_losses, "env", 4)


def _deepspeed():
    exe = shutil.which("deepspeed", path=train_runs.VENV_BIN + os.pathsep + os.environ.get("PATH", ""))
    assert exe, "the deepspeed launcher (installed with deepspeed) is missing"
    return exe


def test_deepspeed_launcher_num_gpus(reference_losses):
    cmd = [_deepspeed(), "--num_gpus", "2", "--master_port", str(train_runs.free_port()), train_runs.SCRIPT] + ARGS
    _check_run(train_runs.check_ok(train_runs.run(cmd, timeout=180)), reference_losses, "env", 2)


def test_deepspeed_launcher_hostfile(reference_losses, tmp_path):
    """--hostfile as on a cluster; --no_ssh/--node_rank is how one node of a multi-node job starts
    (the Slurm GPU script runs exactly this on every node), here with a one-host file."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    cmd = [_deepspeed(), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", "0", "--master_addr", "127.0.0.1",
           "--master_port", str(train_runs.free_port()), train_runs.SCRIPT] + ARGS + train_runs.layout_args(1, 2)
    _check_run(train_runs.check_ok(train_runs.run(cmd, timeout=180)), reference_losses, "env", 2)


def test_mpirun(reference_losses):
    cmd = _mpirun() + ["-x", "PYTHONPATH", sys.executable, train_runs.SCRIPT] + ARGS + train_runs.layout_args(2, 1)
    out = train_runs.check_ok(train_runs.run(cmd, timeout=180, extra_env={"OMP_NUM_THREADS": ""}))
    _check_run(out, reference_losses, "mpi", 2)


# ----------------------------------------------------------------------------- Slurm


def _slurm_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and any(s in out.stdout for s in ("idle", "mix", "alloc"))


@pytest.fixture(scope="module")
def slurm_cluster():
    """The one-node cluster of ../shared/slurm: started here (and stopped afterwards) unless already up."""
    start = os.path.join(SLURM_DIR, "start-local-slurm.sh")
    stop = os.path.join(SLURM_DIR, "stop-local-slurm.sh")
    if not os.path.isfile(start):
        pytest.skip(f"no local Slurm cluster scripts at {SLURM_DIR} (../shared/slurm next to the repository)")
    started_here = False
    if not _slurm_up():
        if os.geteuid() != 0:
            pytest.skip("starting the local Slurm cluster needs root")
        result = subprocess.run(["bash", start], capture_output=True, text=True, timeout=300)
        if result.returncode != 0 or not _slurm_up():
            pytest.skip(f"the local Slurm cluster did not start: {(result.stdout + result.stderr)[-800:]}")
        started_here = True
    yield
    if started_here:
        subprocess.run(["bash", stop], capture_output=True, text=True, timeout=120)


@pytest.mark.slurm
def test_srun(slurm_cluster, reference_losses):
    cmd = ["srun", "-n", "2", "--kill-on-bad-exit=1", sys.executable, train_runs.SCRIPT] + ARGS \
        + train_runs.layout_args(1, 1)
    out = train_runs.check_ok(train_runs.run(cmd, timeout=180, extra_env={"OMP_NUM_THREADS": ""}))
    _check_run(out, reference_losses, "slurm", 2)


@pytest.mark.slurm
def test_cpu_batch_script_under_sbatch(slurm_cluster, tmp_path):
    log = tmp_path / "job.out"
    script = os.path.join(train_runs.ROOT, "examples", "slurm", "pretrain_cpu.sbatch")
    cmd = ["sbatch", "--wait", "--time=10", "-o", str(log),
           f"--export=ALL,PYTHON={sys.executable},REPO={train_runs.ROOT},TRAIN_ITERS=10", script]
    result = train_runs.run(cmd, timeout=300, cwd=str(tmp_path))
    text = log.read_text() if log.exists() else ""
    assert result.returncode == 0, result.stdout + text[-4000:]
    assert "> launcher: slurm, world size 2 = TP 2 x PP 1 x CP 1 x DP 1" in text, text[-3000:]
    rows = train_runs.parse_iterations(text)
    assert [r["iteration"] for r in rows] == [5, 10]
    assert all(r["number of nan iterations"] == 0 for r in rows)
    assert "> done: iteration 10" in text


# ----------------------------------------------------------------------------- unit: device binding
# DeepSpeed binds cuda:$LOCAL_RANK itself (init_process_group(device_id=...) and the engine's set_device);
# the device chosen here must be that one, under every launcher's environment.

LAUNCHER_ENVIRONMENTS = {
    # launcher: (environment, physical GPUs on the node, expected device index)
    "deepspeed --num_gpus 8": ({"RANK": "13", "WORLD_SIZE": "16", "LOCAL_RANK": "5", "LOCAL_SIZE": "8",
                                "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}, 8, 5),
    "deepspeed --include host:2,3": ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_SIZE": "2",
                                      "CUDA_VISIBLE_DEVICES": "2,3"}, 8, 1),
    "torchrun --nproc_per_node 8": ({"RANK": "13", "WORLD_SIZE": "16", "LOCAL_RANK": "5",
                                     "LOCAL_WORLD_SIZE": "8"}, 8, 5),
    "srun, all GPUs visible": ({"SLURM_PROCID": "13", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "16",
                                "SLURM_LOCALID": "5", "SLURM_NODEID": "1", "SLURM_STEP_NODELIST": "gpu[1-2]",
                                "SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_JOB_ID": "9"}, 8, 5),
    "srun --gpus-per-task=1": ({"SLURM_PROCID": "13", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "16",
                                "SLURM_LOCALID": "5", "SLURM_NODEID": "1", "SLURM_STEP_NODELIST": "gpu[1-2]",
                                "SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_JOB_ID": "9",
                                "CUDA_VISIBLE_DEVICES": "5"}, 8, 0),
    "mpirun with exported RANK/WORLD_SIZE": ({"RANK": "13", "WORLD_SIZE": "16", "OMPI_COMM_WORLD_SIZE": "16",
                                              "OMPI_COMM_WORLD_LOCAL_RANK": "5"}, 8, 5),
    "mpirun, one GPU per rank": ({"RANK": "13", "WORLD_SIZE": "16", "OMPI_COMM_WORLD_SIZE": "16",
                                  "OMPI_COMM_WORLD_LOCAL_RANK": "5", "CUDA_VISIBLE_DEVICES": "5"}, 8, 0),
    "Intel MPI / MPICH": ({"RANK": "3", "WORLD_SIZE": "8", "MPI_LOCALRANKID": "3"}, 4, 3),
    "one process, CUDA_VISIBLE_DEVICES=3": ({}, 8, 0),
    "CPU only": ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, 0, None),
    "GPUs hidden": ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": ""}, 8, None),
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHER_ENVIRONMENTS))
def test_device_binding_agrees_with_deepspeed(launcher, monkeypatch):
    environ, physical, expected = LAUNCHER_ENVIRONMENTS[launcher]
    environ = dict(environ)
    if launcher.startswith("one process"):
        environ["CUDA_VISIBLE_DEVICES"] = "3"
    d = launch.discover(environ)
    visible = launch.visible_cuda_device_count(environ, physical)
    index = launch.bind_cuda_device(d, visible, environ)
    assert index == expected
    if expected is None:
        return
    # what DeepSpeed 0.19 reads: comm/torch.py device_id=cuda:$LOCAL_RANK; engine._set_distributed_vars
    # set_device(int(LOCAL_RANK)) after asserting LOCAL_RANK == OMPI_COMM_WORLD_LOCAL_RANK under OpenMPI
    assert int(environ["LOCAL_RANK"]) == expected < visible
    if "OMPI_COMM_WORLD_LOCAL_RANK" in environ:
        assert environ["OMPI_COMM_WORLD_LOCAL_RANK"] == environ["LOCAL_RANK"]


def test_more_local_ranks_than_gpus_is_refused():
    d = launch.discover({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "5"})
    with pytest.raises(ValueError, match="node-local rank 5 has no GPU: only 4 are visible"):
        launch.bind_cuda_device(d, 4, {})


def test_local_rank_is_never_the_global_rank_by_default():
    """RANK/WORLD_SIZE without any node-local variable on a multi-node job: refused, not guessed."""
    with pytest.raises(ValueError, match="export LOCAL_RANK"):
        launch.discover({"RANK": "13", "WORLD_SIZE": "16"})
    # ... but when every rank is on this node the global rank is the local rank
    assert launch.discover({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}).local_rank == 3
    # srun step with the variables exported by a wrapper: SLURM_LOCALID
    assert launch.discover({"RANK": "13", "WORLD_SIZE": "16", "SLURM_STEP_ID": "0", "SLURM_LOCALID": "5",
                            "SLURM_PROCID": "13"}).local_rank == 5


@pytest.mark.parametrize("visible, physical, expected", [
    (None, 8, 8), ("0,1", 8, 2), ("5", 8, 1), ("", 8, 0), ("-1", 8, 0), ("GPU-3f2a,GPU-77b1", 8, 2), ("0,1", 0, 0),
])
def test_visible_cuda_device_count(visible, physical, expected):
    environ = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    assert launch.visible_cuda_device_count(environ, physical) == expected


def _job_field(job_id: str, name: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30).stdout
    for field in out.split():
        if field.startswith(name + "="):
            return field.split("=", 1)[1]
    return "GONE" if name == "JobState" else ""  # purged after completion


def _wait(predicate, timeout, what, log):
    import time
    deadline = time.time() + timeout
    while not predicate():
        tail = log.read_text()[-3000:] if log.exists() else ""
        assert time.time() < deadline, f"timed out waiting for {what}\n{tail}"
        time.sleep(3)


_ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "GONE")
LOCAL_CLUSTER = "local"  # ClusterName in ../shared/slurm/start-local-slurm.sh (job ids repeat across clusters)


@pytest.mark.slurm
def test_cpu_batch_script_time_limit_save_requeue_resume(slurm_cluster, tmp_path):
    """The CPU batch script under a real time limit: Slurm's --signal=USR1@120 warning arrives mid-run;
    the ranks save and write "unfinished", the script requeues the job, and the restarted job (time limit
    raised again while it waits) resumes from that checkpoint and finishes. slurmctld looks at time
    limits every 30 s, so "the warning arrives mid-run" would be a race against the run's speed: the
    ranks are stopped (SIGSTOP) once their handlers are installed, the job's time limit is cut so that the
    warning is due, and they continue once Slurm's signal has reached them (tests/helpers/slurm_jobs.py:
    freeze_until_signalled; Slurm, the signal path, the save and the requeue are all real). Slurm holds a
    requeued job for about 2 minutes before it starts again; the test releases it at once."""
    import re
    import signal

    from tests.helpers import slurm_jobs as S

    client = S.SlurmClient()
    script = os.path.join(train_runs.ROOT, "examples", "slurm", "pretrain_cpu.sbatch")
    train_iters = 20  # the warning comes at the first iterations (the ranks wait for it, stopped)
    log, save = tmp_path / "job.out", tmp_path / "ckpt"
    cmd = ["sbatch", "--parsable", "--time=30", "--signal=USR1@120", "-o", str(log),
           f"--export=ALL,PYTHON={sys.executable},REPO={train_runs.ROOT},TRAIN_ITERS={train_iters},"
           f"SAVE_DIR={save},EXTRA_ARGS=--num-workers 0 --eval-iters 0 --log-interval 1", script]
    sub = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=str(tmp_path),
                         env=train_runs.env({"OMP_NUM_THREADS": ""}))
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]
    try:
        pids = S.wait_for_handlers(job, 2, signal.SIGUSR1, 900, str(log), cluster=LOCAL_CLUSTER)
        S.freeze_until_signalled(pids, lambda: client.cut_time_limit(job, 120), signal.SIGUSR1, 120, str(log))
        _wait(lambda: "requeueing job" in log.read_text() or _job_field(job, "JobState") in _ENDED,
              600, "the time-limit save", log)
        _wait(lambda: _job_field(job, "JobState") in ("PENDING", "REQUEUED", "RUNNING") + _ENDED
              and "start 2" in log.read_text() or _job_field(job, "JobState") == "PENDING", 300, "the requeue", log)
        # Slurm holds a requeued job (its begin time ~2 minutes on); release it now (an error if it is
        # already running is harmless)
        client.release(job, time_limit_minutes=30)
        _wait(lambda: _job_field(job, "JobState") in _ENDED, 1200, "the restarted job to finish", log)
    finally:
        subprocess.run(["scancel", job], capture_output=True, timeout=30)
    text = log.read_text()
    assert _job_field(job, "JobState") in ("COMPLETED", "GONE"), text[-4000:]
    assert f"> done: iteration {train_iters}" in text, text[-4000:]
    assert f"> exit status: finished {train_iters}/{train_iters}" in text
    stops = [int(m) for m in re.findall(r"> exit status: unfinished (\d+)/\d+ signal SIGUSR1", text)]
    assert len(stops) == 1 and 0 < stops[0] < train_iters, text[-4000:]
    assert f"requeueing job {job}" in text and f"job {job} (start 2)" in text
    # the restart resumed where the time-limit save left off
    assert [int(m) for m in re.findall(r"> training from iteration (\d+) to", text)] == [0, stops[0]]
    rows = train_runs.parse_iterations(text)
    assert rows[-1]["iteration"] == train_iters and all(r["number of nan iterations"] == 0 for r in rows)


# --------------------------------------------------------------------------- the network between hosts
# rank 2 of 4, on the second of two hosts (2 ranks each), as each launcher presents it
MULTI_HOST = {
    "deepspeed": {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_SIZE": "2", "CROSS_RANK": "1",
                  "CROSS_SIZE": "2", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"},
    "torchrun": {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
                 "MASTER_ADDR": "node0", "MASTER_PORT": "29500"},
    "slurm": {"SLURM_PROCID": "2", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "0",
              "SLURM_NODEID": "1", "SLURM_STEP_NODELIST": "node[0-1]", "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
              "SLURM_JOB_ID": "7"},
    "mpirun": None,  # discovered through mpi4py: what _discover_mpi returns on that rank
}
SINGLE_HOST = {
    "deepspeed": {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "LOCAL_SIZE": "4", "CROSS_SIZE": "1",
                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
    "torchrun": {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
    "slurm": {"SLURM_PROCID": "2", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "2",
              "SLURM_NODEID": "0", "SLURM_STEP_NODELIST": "node0", "SLURM_STEP_TASKS_PER_NODE": "4",
              "SLURM_JOB_ID": "7", "MASTER_ADDR": "localhost"},
    "mpirun": None,
}


def _env(table, launcher):
    if launcher == "mpirun":
        multi = table is MULTI_HOST
        return launch.DistributedEnv(2, 4, 0 if multi else 2, "node0" if multi else "127.0.0.1", 29500, "mpi",
                                     2 if multi else 4), {"OMPI_COMM_WORLD_SIZE": "4"}
    environ = dict(table[launcher])
    return launch.discover(environ), environ


class _Net:
    """A stand-in network: what names resolve to, what each probe answers, and a clock the probes advance."""

    def __init__(self, addresses, answers=(None,), probe_s=5.0):
        self.addresses, self.answers, self.probe_s = addresses, list(answers), probe_s
        self.now, self.probes = 0.0, []

    def resolve(self, host):
        if isinstance(self.addresses, Exception):
            raise self.addresses
        return self.addresses

    def probe(self, address, port, timeout):
        self.probes.append((address, port))
        self.now += min(timeout, self.probe_s)
        return self.answers[min(len(self.probes) - 1, len(self.answers) - 1)]

    def sleep(self, seconds):
        self.now += seconds

    def check(self, env, environ):
        return launch.master_address_problem(env, environ, "node1", resolve=self.resolve, probe=self.probe,
                                             clock=lambda: self.now, sleep=self.sleep)


@pytest.mark.parametrize("launcher", sorted(MULTI_HOST))
def test_multi_host_is_recognised_for_every_launcher(launcher):
    assert launch.is_multi_host(*_env(MULTI_HOST, launcher))
    assert not launch.is_multi_host(*_env(SINGLE_HOST, launcher))


@pytest.mark.parametrize("launcher", sorted(MULTI_HOST))
@pytest.mark.parametrize("loopback", [["127.0.0.1"], ["127.0.1.1"], ["::1"], ["127.0.0.1", "::1"]])
def test_loopback_master_of_a_multi_host_job_is_refused_in_one_line(launcher, loopback):
    env, environ = _env(MULTI_HOST, launcher)
    net = _Net(loopback)
    line = net.check(env, environ)
    assert line == (f"the master address node0 resolves to {', '.join(loopback)} (loopback) on rank 2 of 4 on host "
                    f"node1, but the job spans several hosts (2 of its 4 ranks on this one): the other hosts cannot "
                    f"reach it; set the launcher's master address (deepspeed --master_addr, torchrun --master-addr, "
                    f"MASTER_ADDR) to an address of the first host that every host can reach")
    assert net.probes == []  # decided without touching the network


@pytest.mark.parametrize("launcher", sorted(MULTI_HOST))
def test_single_host_job_with_a_loopback_master_is_fine(launcher):
    net = _Net(["127.0.0.1"])
    assert net.check(*_env(SINGLE_HOST, launcher)) is None and net.probes == []


@pytest.mark.parametrize("launcher", sorted(MULTI_HOST))
def test_reachable_master_passes_after_one_probe(launcher):
    net = _Net(["10.1.0.1"])
    assert net.check(*_env(MULTI_HOST, launcher)) is None
    assert net.probes == [("10.1.0.1", _env(MULTI_HOST, launcher)[0].master_port)]


def test_unreachable_master_is_refused_after_the_probe_window():
    env, environ = _env(MULTI_HOST, "torchrun")
    net = _Net(["10.1.0.1"], answers=["timed out"])
    line = net.check(env, environ)
    assert line == ("rank 2 of 4 on host node1 cannot reach the master address node0 (10.1.0.1) port 29500: timed out "
                    "(tried for 60 s); check the route and firewall between the hosts, or choose the network "
                    "interface with GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME (docs/multinode.md)")
    assert launch.MASTER_PROBE_S <= net.now < launch.MASTER_PROBE_S + 6   # bounded: not a 10-minute hang


def test_master_that_comes_up_late_is_accepted():
    """Rank 0 may not listen yet: timeouts, then an answer inside the window."""
    net = _Net(["10.1.0.1"], answers=["timed out", "timed out", None])
    assert net.check(*_env(MULTI_HOST, "deepspeed")) is None and len(net.probes) == 3


def test_no_route_to_the_master_is_final_at_once():
    net = _Net(["10.1.0.1"], answers=[os.strerror(__import__("errno").ENETUNREACH)])
    line = net.check(*_env(MULTI_HOST, "slurm"))
    assert "cannot reach the master address node0 (10.1.0.1) port" in line and "Network is unreachable" in line
    assert len(net.probes) == 1


def test_unresolvable_master_is_refused():
    import socket
    net = _Net(socket.gaierror(-2, "Name or service not known"))
    line = net.check(*_env(MULTI_HOST, "deepspeed"))
    assert line == ("the master address node0 does not resolve on rank 2 of 4 on host node1 (Name or service not "
                    "known); give the launcher a master address every host can resolve")


def test_probe_counts_a_refusal_as_reachable():
    """The real probe: a closed port of a host that is there refuses the connection -- reachable."""
    port = launch.find_free_port()
    assert launch._probe("127.0.0.1", port, 2.0) is None


@pytest.mark.parametrize("environ, problem", [
    ({}, None),
    ({"GLOO_SOCKET_IFNAME": "eth0"}, None),
    ({"GLOO_SOCKET_IFNAME": "eth0,ib0"}, None),
    ({"GLOO_SOCKET_IFNAME": "eth9"}, "GLOO_SOCKET_IFNAME=eth9 names no interface of host node1 (eth9 missing; "
                                     "it has lo, eth0, ib0)"),
    ({"NCCL_SOCKET_IFNAME": "eth"}, None),          # a prefix
    ({"NCCL_SOCKET_IFNAME": "=eth0"}, None),        # an exact name
    ({"NCCL_SOCKET_IFNAME": "^docker,lo"}, None),   # exclusions are not checked
    ({"NCCL_SOCKET_IFNAME": "=eth"}, "NCCL_SOCKET_IFNAME==eth matches no interface of host node1 (it has lo, eth0, "
                                     "ib0)"),
    ({"NCCL_SOCKET_IFNAME": "enp"}, "NCCL_SOCKET_IFNAME=enp matches no interface of host node1 (it has lo, eth0, "
                                    "ib0)"),
])
def test_socket_interface_names_are_checked(environ, problem):
    assert launch.socket_interface_problem(environ, ["lo", "eth0", "ib0"], "node1") == problem


def test_multi_host_job_with_a_localhost_master_is_refused_before_the_process_group(tmp_path):
    """The whole entry point, as rank 2 of a 2-host job would start with MASTER_ADDR=localhost: one line, exit 2,
    within seconds (before torch is imported, let alone a rendezvous)."""
    env = {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "localhost",
           "MASTER_PORT": "29500"}
    r = train_runs.run([sys.executable, train_runs.SCRIPT] + train_runs.TINY_MODEL
                       + ["--mock-data", "--vocab-size", "100", "--train-iters", "2", "--micro-batch-size", "1",
                          "--lr", "1e-3", "--global-batch-size", "4"], timeout=120, extra_env=env)
    assert r.returncode == 2, r.stdout[-3000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pretrain_tokenformer.py: error: the master address localhost "
                                                   "resolves to ") and "(loopback)" in lines[0], r.stdout[-3000:]
