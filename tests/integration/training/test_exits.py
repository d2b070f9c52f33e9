"""Clean exits: --exit-interval, --exit-duration-in-mins and a pre-emption signal (SIGUSR1) delivered to
ONE rank only. Every rank must agree, finish the iteration, save the checkpoint of that iteration
(`latest` points at it) and exit 0."""

import os
import signal
import time

import psutil
import pytest

from tests.helpers import train_runs
from tests.helpers.ops_checks import is_rank_process

pytestmark = pytest.mark.slow

ARGS = train_runs.TINY_MODEL + ["--micro-batch-size", "1", "--global-batch-size", "4", "--lr", "1e-3",
                                "--mock-data", "--vocab-size", "100", "--log-interval", "1", "--eval-iters", "0"]


def _latest(save_dir):
    with open(os.path.join(save_dir, "latest")) as f:
        return f.read().strip()


def test_exit_interval_saves_and_exits_zero(tmp_path):
    save = str(tmp_path / "ckpt")
    cmd = train_runs.torchrun(2, ARGS + ["--train-iters", "50", "--exit-interval", "3", "--save", save]
                              + train_runs.layout_args(1, 2))
    out = train_runs.check_ok(train_runs.run(cmd, timeout=180))
    assert [r["iteration"] for r in train_runs.parse_iterations(out)] == [1, 2, 3]
    assert "exiting at iteration 3 (--exit-interval 3)" in out
    assert _latest(save).endswith("3") and os.path.isdir(os.path.join(save, _latest(save)))


def test_exit_duration(tmp_path):
    """A limit that has passed by the first iteration: stop after it (and save)."""
    save = str(tmp_path / "ckpt")
    cmd = train_runs.torchrun(1, ARGS + ["--train-iters", "50", "--exit-duration-in-mins", "0.0001", "--save", save])
    out = train_runs.check_ok(train_runs.run(cmd, timeout=120))
    assert [r["iteration"] for r in train_runs.parse_iterations(out)] == [1]
    assert "exiting at iteration 1 (--exit-duration-in-mins 0.0001)" in out
    assert _latest(save).endswith("1")


def test_sigusr1_to_one_rank_stops_all_ranks_cleanly(tmp_path):
    save = str(tmp_path / "ckpt")
    cmd = train_runs.torchrun(2, ARGS + ["--train-iters", "100000", "--save", save] + train_runs.layout_args(2, 1))
    proc = train_runs.start(cmd)
    try:
        launcher = psutil.Process(proc.pid)
        deadline = time.time() + 120
        ranks = []
        while time.time() < deadline and len(ranks) < 2:
            ranks = [p for p in launcher.children(recursive=True) if is_rank_process(p)]  # not loader workers
            time.sleep(0.5)
        assert len(ranks) == 2, "ranks did not start"
        # wait until training runs, then pre-empt rank 1 only (Slurm would signal every task)
        buffered = []
        while time.time() < deadline:
            line = proc.stdout.readline()
            buffered.append(line)
            if line.lstrip().startswith("iteration        2/"):
                break
        victim = [p for p in ranks if "RANK" in p.environ() and p.environ()["RANK"] == "1"][0]
        os.kill(victim.pid, signal.SIGUSR1)
        result = train_runs.finish(proc, timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = "".join(buffered) + result.stdout
    assert result.returncode == 0, out[-4000:]
    rows = train_runs.parse_iterations(out)
    last = rows[-1]["iteration"]
    assert 2 <= last < 100000
    assert f"exiting at iteration {last} (" in out
    assert _latest(save).endswith(str(last))
