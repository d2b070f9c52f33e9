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
    assert not zygote.compatible({**env, "PYTHONHASHSEED": "0"}, env)
    assert not zygote.compatible({**env, "DS_ACCELERATOR": "cuda"}, env)
    assert zygote.compatible({**env, "MEGATRON_TOKENFORMER_CHECK_COLLECTIVES": "0"}, env)  # read at run time
    assert zygote.compatible({**env, "TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"}, env)        # read at run time
    # set by the forked rank itself (the module path is checked: see test_stand_ins_fork_script_runs_only)
    assert zygote.compatible({**env, "PYTHONPATH": "/elsewhere", "OMP_NUM_THREADS": "2"}, env)
    other = {**env, "PYTHONHASHSEED": "0"}
    assert zygote.server_socket(other) != zygote.server_socket(env)
    out = train_runs.check_ok(train_runs.run(zygote.launch_command(
        1, train_runs.SCRIPT, ARGS + ["--train-iters", "1"], other, None), timeout=300, extra_env=other))
    assert "iteration        1/" in out


PROBE = """
import json, os, sys
import psutil, torch
import megatron_tokenformer
ancestors = [p.pid for p in psutil.Process().parents()]
print(json.dumps({"forked": int(os.environ["PROBE_SERVER"]) in ancestors, "rank": os.environ.get("RANK"),
                  "world": os.environ.get("WORLD_SIZE"), "threads": torch.get_num_threads(),
                  "package": os.path.realpath(megatron_tokenformer.__file__), "argv": sys.argv[1:]}))
sys.exit(int(os.environ.get("PROBE_EXIT", "0")))
"""


def test_stand_ins_fork_script_runs_only(tmp_path):
    """``python``/``torchrun`` in a script run under ``shim_env``: script runs are forked by the server (one
    rank, or torchrun's N with its variables; OMP_NUM_THREADS applied in the rank); ``python -c``, a run
    whose PYTHONPATH finds another copy of the package, and a refused run are the real programs; exit
    codes pass through."""
    import json
    import subprocess

    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    other = tmp_path / "other" / "megatron_tokenformer"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("")
    env = zygote.shim_env(train_runs.env())
    server = next(s["proc"].pid for s in zygote._SERVERS.values()
                  if s["path"] == env["ZYGOTE_SOCKET"] and s["pid"] == os.getpid())
    script = f"""set -e
python {probe} a b
torchrun --standalone --nproc_per_node 2 {probe} c
OMP_NUM_THREADS=2 $PYTHON {probe}
PYTHONPATH={tmp_path / 'other'} python {probe}
python -c 'import os, psutil; print({{"c": int(os.environ["PROBE_SERVER"]) in \
[p.pid for p in psutil.Process().parents()]}})'
PROBE_EXIT=3 python {probe} || echo "exit $?"
"""
    proc = subprocess.run(["bash", "-c", script], env=dict(env, PROBE_SERVER=str(server)), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    rows = [json.loads(line) for line in lines if line.startswith("{\"forked")]
    one, ranks, threads, elsewhere, failing = rows[0], rows[1:3], rows[3], rows[4], rows[5]
    assert one["forked"] and one["argv"] == ["a", "b"] and one["rank"] is None and one["threads"] == 1
    assert sorted(r["rank"] for r in ranks) == ["0", "1"] and all(r["forked"] and r["world"] == "2" for r in ranks)
    assert threads["forked"] and threads["threads"] == 2
    assert not elsewhere["forked"] and elsewhere["package"] == str((other / "__init__.py").resolve())
    assert "{'c': False}" in lines and failing["forked"] and lines[-1] == "exit 3"
