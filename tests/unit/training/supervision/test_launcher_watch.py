"""training/supervision/launcher_watch.py: a rank notices that its launcher died (without any training)."""

import os
import signal
import subprocess
import sys
import time

import psutil

from megatron_tokenformer.training.supervision import launcher_watch
from tests.helpers import train_runs

RANK = r"""
import time
from megatron_tokenformer.training.supervision import launcher_watch
chain = launcher_watch.start(interval=0.2)
print("watching", [c[0] for c in chain], flush=True)
deadline = time.time() + 60
while launcher_watch.reason() is None and time.time() < deadline:
    time.sleep(0.1)
print("reason:", launcher_watch.reason(), flush=True)
"""

# A stand-in for torchrun: a script whose name is `torchrun`, starting one "rank" and waiting for it.
LAUNCHER = """#!{python}
import subprocess, sys
subprocess.Popen([sys.executable, "-c", {rank!r}]).wait()
"""


def test_is_launcher():
    assert launcher_watch.is_launcher(["/venv/bin/python", "/venv/bin/deepspeed", "--num_gpus", "2", "x.py"])
    assert launcher_watch.is_launcher(["python", "-u", "-m", "deepspeed.launcher.launch", "--world_info=e30="])
    assert launcher_watch.is_launcher(["/usr/bin/python3", "-m", "torch.distributed.run", "--nproc_per_node", "2"])
    assert launcher_watch.is_launcher(["torchrun", "--nproc_per_node", "2", "x.py"])
    assert launcher_watch.is_launcher(["mpirun", "-np", "2", "python", "x.py"])
    assert launcher_watch.is_launcher(["slurmstepd: [1234.0]"])   # how slurmstepd names itself
    assert launcher_watch.is_launcher(["/usr/sbin/slurmstepd"])
    assert not launcher_watch.is_launcher(["python", "-m", "pytest", "tests"])
    assert not launcher_watch.is_launcher(["bash", "-c", "torchrun x.py"])
    assert not launcher_watch.is_launcher(["python", "train.py", "--note", "deepspeed"])


def test_no_launcher_no_watch():
    """Started from pytest (not a launcher): nothing is watched, so a nohup run outlives its shell."""
    assert launcher_watch.launcher_chain() == []


def test_rank_notices_its_launcher_died(tmp_path):
    script = tmp_path / "torchrun"
    script.write_text(LAUNCHER.format(python=sys.executable, rank=RANK))
    script.chmod(0o755)
    proc = subprocess.Popen([str(script)], env=train_runs.env(), stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    rank = None
    try:
        line = proc.stdout.readline()
        assert line.startswith("watching [%d]" % proc.pid), line
        rank = [c for c in psutil.Process(proc.pid).children() if c.pid != proc.pid][0]
        os.kill(proc.pid, signal.SIGKILL)       # the launcher dies without telling anyone
        proc.wait()
        killed_at = time.time()
        rank.wait(timeout=30)                   # the rank saw it and ended on its own
        out = proc.stdout.read()
        assert f"reason: the launcher ended (parent pid {proc.pid}" in out, out
        assert time.time() - killed_at < 10
        assert not psutil.pid_exists(rank.pid)
    finally:
        if rank is not None and rank.is_running():
            rank.kill()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
