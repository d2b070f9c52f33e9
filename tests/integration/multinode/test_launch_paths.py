"""Every non-Slurm multi-node launch path, on 2 simulated hosts x 2 ranks (tests/helpers/multihost.py):
``deepspeed --hostfile`` (pdsh over ssh), ``deepspeed --no_ssh --node_rank`` on each host, torchrun with
a static rendezvous (``--nnodes 2 --node-rank --master-addr``) and with c10d, and ``mpirun --host``
(OpenMPI starting its daemons over ssh). Each reproduces, within 1e-5, the lm loss and gradient norm of
every iteration of the one-host run of the same layout: the run of tests/integration/training/
test_layouts.py (4 ranks on this host; itself checked against a plain PyTorch loop), shared
through the session fixture ``layout_pool`` so that it runs once per session.

The layouts put the parallel dimensions where a cluster would (ranks 0-1 on one host, 2-3 on the
other; TP fastest, then DP, then PP): TP 2 x DP 2 keeps each tensor-parallel group inside a host and
reduces data-parallel gradients across the hosts; PP 2 x DP 2 makes each host one pipeline stage
(data parallel inside the host). Each launcher runs one layout, each layout is run by two or three
launchers. The hosts are shared with the other multi-node tests (the session fixture ``two_hosts``)."""

import os
import re
import shutil
import sys
import time

import pytest

from tests.helpers import layout_runs, train_runs

pytestmark = pytest.mark.slow

ITERS = layout_runs.ITERS
# (tp, pp, dp, zero stage, recomputation), as in test_layouts.LAYOUTS
LAYOUTS = {"tp_inside_host_dp_across": (2, 1, 2, 1, 0), "pp_stage_per_host": (1, 2, 2, 1, 0)}
LAUNCHERS = {"deepspeed_pdsh": "pp_stage_per_host", "deepspeed_no_ssh": "tp_inside_host_dp_across",
             "torchrun_static": "tp_inside_host_dp_across", "torchrun_c10d": "pp_stage_per_host",
             "mpirun": "tp_inside_host_dp_across"}
CONCURRENCY = 2
TIMEOUT = 300
MPIRUN = shutil.which("mpirun")


def _deepspeed():
    exe = shutil.which("deepspeed", path=train_runs.VENV_BIN + os.pathsep + os.environ.get("PATH", ""))
    assert exe, "the deepspeed launcher (installed with deepspeed) is missing"
    return exe


def _launch(mh, launcher, args, workdir):
    """[(host, argv, env)] that start ``launcher`` across both hosts (one entry per process to start by hand)."""
    h0, h1 = mh.hosts
    port = str(train_runs.free_port())
    env = mh.env(base=train_runs.env())
    script = [train_runs.SCRIPT] + args
    if launcher == "deepspeed_pdsh":
        # the runner on the first host, as a user types it; pdsh starts deepspeed.launcher.launch on both
        # hosts over ssh. DeepSpeed exports only PYTHON*/... variables to them: the rest through DS_ENV_FILE.
        ds_env = os.path.join(workdir, "deepspeed_env")
        with open(ds_env, "w") as f:
            f.write("".join(f"{k}={env[k]}\n" for k in ("OMP_NUM_THREADS", "MEGATRON_TOKENFORMER_CHECK_COLLECTIVES")))
        return [(h0, [_deepspeed(), "--hostfile", mh.hostfile(2), "--launcher", "pdsh", "--master_addr", h0.name,
                      "--master_port", port] + script, {**env, "DS_ENV_FILE": ds_env})]
    if launcher == "deepspeed_no_ssh":
        return [(h, [_deepspeed(), "--hostfile", mh.hostfile(2), "--no_ssh", "--node_rank", str(h.index),
                     "--master_addr", h0.name, "--master_port", port] + script, env) for h in mh.hosts]
    if launcher == "torchrun_static":
        return [(h, [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(h.index),
                     "--nproc-per-node", "2", "--master-addr", h0.name, "--master-port", port] + script, env)
                for h in mh.hosts]
    if launcher == "torchrun_c10d":
        return [(h, [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
                     "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{h0.name}:{port}", "--rdzv-id",
                     f"job{port}"] + script, env) for h in mh.hosts]
    if launcher == "mpirun":
        exports = []
        for key in ("PATH", "PYTHONPATH", "PYTHONUNBUFFERED", "MEGATRON_TOKENFORMER_CHECK_COLLECTIVES"):
            exports += ["-x", key]
        return [(h0, [MPIRUN, "--allow-run-as-root", "--host", f"{h0.name}:2,{h1.name}:2", "-np", "4"]
                 + mh.mpirun_args() + exports + [sys.executable] + script, {**env, "OMP_NUM_THREADS": ""})]
    raise ValueError(launcher)


def _start(mh, launcher, workdir):
    os.makedirs(os.path.join(workdir, launcher), exist_ok=True)
    flags = layout_runs.layout_flags(LAYOUTS[LAUNCHERS[launcher]])
    return [mh.popen(h, cmd, env=env) for h, cmd, env in _launch(mh, launcher, flags, os.path.join(workdir, launcher))]


def _collect(procs, timeout):
    """[(returncode, output)] of every process of one job; on timeout kill every process group."""
    deadline, results = time.time() + timeout, []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.time()))
        except Exception:
            for q in procs:
                with __import__("contextlib").suppress(ProcessLookupError):
                    os.killpg(q.pid, 9)
            out, _ = p.communicate()
            out = (out or "") + f"\n[timed out after {timeout} s]"
            p.returncode = p.returncode if p.returncode is not None else -9
        results.append((p.returncode, out or ""))
    return results


@pytest.fixture(scope="module")
def launch_runs(two_hosts, layout_pool, tmp_path_factory):
    """(one-host logs per layout name, launcher -> [(returncode, output) per process started])."""
    workdir = str(tmp_path_factory.mktemp("launch_paths"))
    reference = layout_pool.logs(LAYOUTS.values(), "one-host layout runs")
    t0, running, results = time.time(), [], {}
    pending = [name for name in LAUNCHERS if name != "mpirun" or MPIRUN]
    while pending or running:
        while pending and len(running) < CONCURRENCY:
            launcher = pending.pop(0)
            running.append((launcher, _start(two_hosts, launcher, workdir), time.time()))
        launcher, procs, started = running.pop(0)
        results[launcher] = _collect(procs, TIMEOUT - (time.time() - started))
    print(f"\n[multi-node launch paths] {len(results)} runs in {time.time() - t0:.1f} s wall", file=sys.stderr)
    return {name: reference[layout] for name, layout in LAYOUTS.items()}, results


def _rows(results, hosts=()):
    for rc, out in results:
        assert rc == 0, f"exit {rc}\n{out[-6000:]}"
    logs = "\n".join(out for _, out in results)
    if hosts:  # pdsh prefixes every line of a remote command with "<host>: "
        logs = re.sub(r"^(?:%s): " % "|".join(map(re.escape, hosts)), "", logs, flags=re.MULTILINE)
    rows = train_runs.parse_iterations(logs)
    assert [r["iteration"] for r in rows] == list(range(1, ITERS + 1)), logs[-4000:]
    return rows, logs


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_launcher_across_two_hosts_matches_one_host(launch_runs, two_hosts, launcher):
    if launcher == "mpirun" and not MPIRUN:
        pytest.skip("mpirun (OpenMPI) is not installed")
    layout = LAUNCHERS[launcher]
    reference, results = launch_runs
    ref, _ = _rows([(0, reference[layout])])
    rows, logs = _rows(results[launcher], [h.name for h in two_hosts.hosts])
    assert "world size 4" in logs, logs[-3000:]
    for r, b in zip(rows, ref):
        assert abs(r["lm loss"] - b["lm loss"]) <= 1e-5, (launcher, layout, r["iteration"], r["lm loss"], b["lm loss"])
        assert abs(r["grad norm"] - b["grad norm"]) <= 1e-5, (launcher, layout, r["iteration"])
        assert r["consumed samples"] == b["consumed samples"]
        assert r["number of nan iterations"] == 0 and r["number of skipped iterations"] == 0
    # the run really spanned both hosts, two ranks each, and left nothing running on either
    h0, h1 = (h.name for h in two_hosts.hosts)
    hosts_line = [line for line in logs.splitlines() if line.startswith("> hosts: ")]
    assert hosts_line in ([f"> hosts: {h0}: ranks 0, 1; {h1}: ranks 2, 3"],
                          [f"> hosts: {h1}: ranks 0, 1; {h0}: ranks 2, 3"]), hosts_line  # c10d may swap nodes
    for h in two_hosts.hosts:
        leftover = [pid for pid in two_hosts.pids(h) if "pretrain_tokenformer" in _cmdline(pid)]
        assert leftover == [], (h.name, leftover)


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
