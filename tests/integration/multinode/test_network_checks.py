"""A 2-host job (2 ranks per host) with a loopback master address, or with a socket interface variable naming no
interface, is refused in one line per host before any process group forms (launch.network_problem) -- and the
interface variable reaches the ranks on every host through each launcher's own channel: DeepSpeed's pdsh runner
through its environment file (``DS_ENV_FILE`` / ``.deepspeed_env``), ``mpirun`` through ``-x``."""

import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from tests.helpers import train_runs

pytestmark = pytest.mark.slow

ARGS = train_runs.TINY_MODEL + train_runs.layout_args(2, 1) + [
    "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", "2", "--lr", "1e-3", "--mock-data",
    "--vocab-size", "100", "--eval-iters", "0"]
PREFIX = re.compile(r"^[\w.-]+: ", re.M)  # pdsh prefixes every line with the host's name


def _deepspeed_pdsh(mh, workdir, master, env_lines):
    ds_env = os.path.join(workdir, f"deepspeed_env.{len(os.listdir(workdir))}")
    with open(ds_env, "w") as f:
        f.write("".join(f"{k}={v}\n" for k, v in env_lines.items()))
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", mh.hostfile(2), "--launcher", "pdsh",
           "--master_addr", master, "--master_port", str(train_runs.free_port()), train_runs.SCRIPT] + ARGS
    env = mh.env(base=train_runs.env(), extra={"DS_ENV_FILE": ds_env})
    for key in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        env.pop(key, None)  # only the environment file may bring them to the remote ranks
    return cmd, env


def _run(mh, cmd, env):
    start = time.time()
    r = mh.run(mh.hosts[0], cmd, timeout=300, env=env, cwd=train_runs.ROOT, stderr=subprocess.STDOUT)
    return r, time.time() - start


def _one_line_per_host(text, mh):
    """{host: its error line}, checked: one per host (from that host's first rank), no traceback."""
    lines = [line for line in text.splitlines() if "pretrain_tokenformer.py: error: " in line]
    by_host = {line.split(":", 1)[0]: PREFIX.sub("", line) for line in lines}
    assert len(lines) == len(mh.hosts) and sorted(by_host) == sorted(h.name for h in mh.hosts), text[-4000:]
    assert "Traceback" not in PREFIX.sub("", text), text[-4000:]
    return by_host


def test_loopback_master_refused_on_every_host(two_hosts, tmp_path):
    cmd, env = _deepspeed_pdsh(two_hosts, str(tmp_path), "localhost", {"OMP_NUM_THREADS": "1"})
    r, took = _run(two_hosts, cmd, env)
    assert r.returncode != 0, r.stdout[-4000:]
    for host, line in _one_line_per_host(r.stdout, two_hosts).items():
        assert re.fullmatch(rf"pretrain_tokenformer\.py: error: the master address localhost resolves to [0-9a-f:., ]+ "
                            rf"\(loopback\) on rank [02] of 4 on host {host}, but the job spans several hosts \(2 of "
                            rf"its 4 ranks on this one\): .*", line), line
    assert "iteration" not in r.stdout
    print(f"\n[network checks] loopback master: refused on both hosts, runner ended after {took:.1f} s",
          file=sys.stderr)


def test_interface_variable_reaches_every_host_through_the_deepspeed_env_file(two_hosts, tmp_path):
    cmd, env = _deepspeed_pdsh(two_hosts, str(tmp_path), two_hosts.hosts[0].name,
                               {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "nosuchif0"})
    r, took = _run(two_hosts, cmd, env)
    assert r.returncode != 0, r.stdout[-4000:]
    for host, line in _one_line_per_host(r.stdout, two_hosts).items():
        assert line.startswith(f"pretrain_tokenformer.py: error: GLOO_SOCKET_IFNAME=nosuchif0 names no interface of "
                               f"host {host} (nosuchif0 missing; it has lo, "), line
    print(f"\n[network checks] GLOO_SOCKET_IFNAME through DS_ENV_FILE: refused on both hosts after {took:.1f} s",
          file=sys.stderr)


def test_interface_variable_reaches_every_host_through_mpirun_x(two_hosts):
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("mpirun (OpenMPI) is not installed")
    h0, h1 = two_hosts.hosts
    exports = []
    for key in ("PATH", "PYTHONPATH", "PYTHONUNBUFFERED", "NCCL_SOCKET_IFNAME"):
        exports += ["-x", key]
    cmd = [mpirun, "--allow-run-as-root", "--host", f"{h0.name}:2,{h1.name}:2", "-np", "4", "--tag-output"] \
        + two_hosts.mpirun_args() + exports + [sys.executable, train_runs.SCRIPT] + ARGS
    env = two_hosts.env(base=train_runs.env(), extra={"NCCL_SOCKET_IFNAME": "nosuchif", "OMP_NUM_THREADS": ""})
    r, took = _run(two_hosts, cmd, env)
    assert r.returncode != 0, r.stdout[-4000:]
    lines = [line for line in r.stdout.splitlines() if "pretrain_tokenformer.py: error: " in line]
    assert len(lines) == 2 and "Traceback" not in r.stdout, r.stdout[-4000:]
    for line in lines:  # the first rank of each host: ranks 0 and 2
        assert re.search(r"pretrain_tokenformer\.py: error: NCCL_SOCKET_IFNAME=nosuchif matches no interface of host "
                         rf"({h0.name}|{h1.name}) \(it has lo, ", line), line
    assert {re.search(rf"host ({h0.name}|{h1.name})", line).group(1) for line in lines} == {h0.name, h1.name}
    print(f"\n[network checks] NCCL_SOCKET_IFNAME through mpirun -x: refused on both hosts after {took:.1f} s",
          file=sys.stderr)

