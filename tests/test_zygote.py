"""The suite's fork server (tests/helpers/zygote.py): a run forked by it behaves, as the test sees it, like
the same run started plainly -- same losses, exit status, stdout/stderr, signals, and nothing left running
when the test kills it."""

import os
import signal
import sys
import time

import psutil
import pytest

from tests.helpers import train_runs, zygote

pytestmark = pytest.mark.slow

ARGS = train_runs.TINY_MODEL + ["--micro-batch-size", "1", "--global-batch-size", "4", "--lr", "2e-3", "--mock-data",
                                "--vocab-size", "100", "--seed", "1234", "--log-interval", "1", "--eval-iters", "0"]


def _rows(text):
    return [(r["iteration"], r["lm loss"], r["grad norm"]) for r in train_runs.parse_iterations(text)]


def _zygote_command(nproc, args):
    cmd = train_runs.warm_launch(nproc, args)
    assert cmd[:4] == [sys.executable, "-S", "-I", zygote.CLIENT], cmd
    return cmd


@pytest.mark.parametrize("nproc, layout", [(1, (1, 1)), (2, (1, 2))], ids=["one_rank", "pp2"])
def test_forked_run_equals_the_plain_run(nproc, layout):
    args = ARGS + ["--train-iters", "4"] + train_runs.layout_args(*layout)
    plain = train_runs.check_ok(train_runs.run(train_runs.torchrun(nproc, args), timeout=300))
    forked = train_runs.check_ok(train_runs.run(_zygote_command(nproc, args), timeout=300))
    assert _rows(forked) == _rows(plain) and len(_rows(plain)) == 4
    assert f"world size {nproc} " in forked


def test_exit_status_and_stderr_are_the_runs():
    args = ARGS + ["--train-iters", "4", "--hidden-size", "30"]  # not divisible by the 4 heads: exit 2
    p = train_runs.start(_zygote_command(1, args), merge_stderr=False)
    out, err = train_runs.communicate_or_kill(p, 300)
    plain = train_runs.start([sys.executable, train_runs.SCRIPT] + args, merge_stderr=False)
    plain_out, plain_err = train_runs.communicate_or_kill(plain, 300)
    assert (p.returncode, err) == (plain.returncode, plain_err) and p.returncode == 2, (err, plain_err)


def _server_descendants():
    return {p.pid for s in zygote._SERVERS.values() if s["proc"] is not None
            for p in psutil.Process(s["proc"].pid).children(recursive=True)}


def test_sigterm_reaches_the_rank_and_a_killed_client_takes_the_job_with_it(tmp_path):
    save = str(tmp_path / "ckpt")
    args = ARGS + ["--train-iters", "100000", "--save", save]
    p = train_runs.start(_zygote_command(1, args))
    lines = []
    for line in p.stdout:  # until it trains
        lines.append(line)
        if " iteration        2/" in line:
            break
    p.send_signal(signal.SIGTERM)  # forwarded: the rank saves and exits 0, as a plain run does
    out, _ = train_runs.communicate_or_kill(p, 300)
    text = "".join(lines) + out
    assert p.returncode == 0, text[-3000:]
    assert "signal SIGTERM" in text and os.path.exists(os.path.join(save, "latest")), text[-3000:]

    before = _server_descendants()
    p = train_runs.start(_zygote_command(2, args[:-1] + [str(tmp_path / "ckpt2")]))
    for line in p.stdout:
        if " iteration        2/" in line:
            break
    assert p.poll() is None
    job = _server_descendants() - before
    assert len(job) >= 3, job  # its manager and two ranks (and their data-loader workers)
    os.killpg(p.pid, signal.SIGKILL)  # what a test's timeout does
    p.wait()
    deadline = time.time() + 60
    while time.time() < deadline and job & _server_descendants():
        time.sleep(0.2)
    assert not job & _server_descendants()


def test_an_environment_that_imports_read_differently_gets_its_own_server():
    env = train_runs.env()
    assert zygote.compatible(dict(env), env)
    assert not zygote.compatible({**env, "PYTHONPATH": "/elsewhere"}, env)
    assert not zygote.compatible({**env, "OMP_NUM_THREADS": "2"}, env)
    assert zygote.compatible({**env, "MEGATRON_TOKENFORMER_CHECK_COLLECTIVES": "0"}, env)  # read at run time
    assert zygote.compatible({**env, "TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"}, env)        # read at run time
    other = {**env, "PYTHONHASHSEED": "0"}
    assert zygote.server_socket(other) != zygote.server_socket(env)
    out = train_runs.check_ok(train_runs.run(zygote.launch_command(
        1, train_runs.SCRIPT, ARGS + ["--train-iters", "1"], other, None), timeout=300, extra_env=other))
    assert "iteration        1/" in out
    # importing torch with OMP_NUM_THREADS > 1 starts a thread pool: no server, the plain command
    threads = {**env, "OMP_NUM_THREADS": "2"}
    plain = [sys.executable, train_runs.SCRIPT]
    assert zygote.launch_command(1, train_runs.SCRIPT, [], threads, plain) is plain
