"""The ``deepspeed --hostfile --launcher pdsh`` runner on two simulated hosts x 2 ranks (TP 2 inside a host, DP 2
across the hosts), stopped three ways: its ssh sessions dropped, SIGTERM, SIGINT. Every time every rank on both
hosts saves one complete checkpoint and exits; each run resumes from the previous one's checkpoint, and the losses
of the three runs together equal an uninterrupted one-host run of the same layout (<= 1e-5).

Before the fix, SIGTERM to the runner ended every rank within ~9 s with nothing saved: the runner kills pdsh
(and so the ssh sessions that carry the ranks' output) before ``pkill`` reaches the per-host launchers, which
then pass SIGTERM on to their ranks; the logging rank's next line failed with EPIPE, it died of the
BrokenPipeError and its peers failed in the next collective (training/output_channel.py).

The hosts share this machine's pid namespace, so the runner's ``pkill -f <python> -u -m deepspeed.launcher.launc``
on each host reaches the launchers of both (each gets SIGTERM twice; real hosts get one each) and also any other
DeepSpeed job on this machine started with the same interpreter path. The jobs here therefore run with a private
interpreter path (a view of this virtual environment under the test's temporary directory), which only their
own launchers match.
"""

import os
import re
import signal
import sys
import time

import psutil
import pytest

from megatron_tokenformer.checkpointing import file_checks
from tests.helpers import ops_checks as C
from tests.helpers import train_runs

pytestmark = pytest.mark.slow

ITERS = 100000   # never reached: every run is stopped; the same value for every run (the data order depends on it)
ARGS = train_runs.TINY_MODEL + train_runs.layout_args(2, 1) + [
    "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", str(ITERS), "--lr", "1e-3",
    "--lr-decay-style", "constant", "--mock-data", "--vocab-size", "100", "--log-interval", "1", "--eval-iters", "0",
    "--seed", "5"]
REFERENCE_ITERS = 30  # the uninterrupted run's length: more than the three stopped runs reach together
PREFIX = re.compile(r"^[\w.-]+: ", re.M)  # pdsh prefixes every line with the host's name
TOLERANCE = 1e-5


def private_python(folder):
    """An interpreter path only this test uses, with this environment's packages: a view of the virtual
    environment (its pyvenv.cfg, its lib/ and the base interpreter), or a link to a plain interpreter."""
    os.makedirs(os.path.join(folder, "bin"), exist_ok=True)
    exe = os.path.join(folder, "bin", "python")
    if not os.path.exists(exe):
        os.symlink(os.path.realpath(sys.executable), exe)
        if sys.prefix != sys.base_prefix:
            with open(os.path.join(sys.prefix, "pyvenv.cfg")) as src:
                config = src.read()
            with open(os.path.join(folder, "pyvenv.cfg"), "w") as dst:
                dst.write(config)
            os.symlink(os.path.join(sys.prefix, "lib"), os.path.join(folder, "lib"))
    return exe


class Run:
    """One ``deepspeed --hostfile`` job started on the first host, its output read by a thread."""

    def __init__(self, mh, python, workdir, name, extra):
        import threading
        h0 = mh.hosts[0]
        self.python = python
        self.status = os.path.join(workdir, f"{name}.status")
        env = mh.env(base=train_runs.env())
        ds_env = os.path.join(workdir, "deepspeed_env")  # what DeepSpeed's pdsh runner does not export by itself
        with open(ds_env, "w") as f:
            f.write("".join(f"{k}={env[k]}\n" for k in ("OMP_NUM_THREADS", "MEGATRON_TOKENFORMER_CHECK_COLLECTIVES")))
        cmd = [python, "-m", "deepspeed.launcher.runner", "--hostfile", mh.hostfile(2), "--launcher", "pdsh",
               "--master_addr", h0.name, "--master_port", str(train_runs.free_port()), train_runs.SCRIPT] + ARGS \
            + ["--exit-status-file", self.status] + extra
        self.proc = mh.popen(h0, cmd, env={**env, "DS_ENV_FILE": ds_env}, cwd=train_runs.ROOT)
        self.lines = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")),
                                        daemon=True)
        self._reader.start()

    @property
    def text(self):
        return PREFIX.sub("", "".join(self.lines))

    def wait_for_iteration(self, n, timeout=300):
        deadline = time.time() + timeout
        while time.time() < deadline:
            done = [r["iteration"] for r in train_runs.parse_iterations(self.text)]
            if done and done[-1] >= n:
                return
            assert self.proc.poll() is None, f"the job ended:\n{self.text[-4000:]}"
            time.sleep(0.3)
        raise AssertionError(f"iteration {n} not reached:\n{self.text[-4000:]}")

    def processes(self):
        """Every process of the job on either host (the launchers, ranks and loader workers): those that run
        the private interpreter."""
        out = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if (p.info["cmdline"] or [""])[0] == self.python and p.pid != self.proc.pid:
                    out.append(p.pid)
            except psutil.Error:
                pass
        return out

    def stop(self, how):
        """Stop the job (``"SIGTERM"``, ``"SIGINT"`` or ``"ssh"``); returns the seconds until every process of
        it on both hosts has ended."""
        pids = self.processes()
        assert len([p for p in pids if "pretrain_tokenformer.py" in " ".join(psutil.Process(p).cmdline())]) >= 4
        start = time.time()
        if how == "ssh":
            # the sessions that carry both hosts' output drop (the ssh clients die); the runner stays
            runner = psutil.Process(self.proc.pid)
            clients = [c for c in runner.children(recursive=True) if c.name() == "ssh"]
            assert len(clients) == 2, [c.cmdline() for c in runner.children(recursive=True)]
            for c in clients:
                c.kill()
        else:
            os.kill(self.proc.pid, getattr(signal, how))
        C.wait_gone(pids, 120)
        took = time.time() - start
        self.proc.wait(timeout=60)
        self._reader.join(timeout=30)
        return took

    def kill(self):
        for pid in self.processes() + [self.proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _losses(text):
    return {r["iteration"]: r["lm loss"] for r in train_runs.parse_iterations(text)}


@pytest.fixture(scope="module")
def stopped_runs(two_hosts, tmp_path_factory):
    """Three jobs on --save, each resuming from the last: stopped by a dropped ssh session, SIGTERM, SIGINT."""
    workdir = str(tmp_path_factory.mktemp("runner_signals"))
    python = private_python(os.path.join(workdir, "python"))
    save = os.path.join(workdir, "ckpt")
    # the reference, side by side with the stopped runs: the same layout on one host, uninterrupted (its ranks
    # forked by the suite's fork server: the launcher is not what it checks)
    ref = train_runs.start(train_runs.warm_launch(4, ARGS + ["--exit-interval", str(REFERENCE_ITERS)]))
    results = []
    try:
        for how in ("ssh", "SIGTERM", "SIGINT"):
            start_from = results[-1]["saved"] if results else 0
            run = Run(two_hosts, python, workdir, how, ["--save", save, "--save-interval", str(ITERS)]
                      + (["--load", save] if results else []))
            try:
                run.wait_for_iteration(start_from + 2)
                took = run.stop(how)
            finally:
                run.kill()
            assert os.path.exists(run.status), (f"no rank finished after {how} (no --exit-status-file; --save holds "
                                                f"{sorted(os.listdir(save))}):\n{run.text[-4000:]}")
            with open(run.status) as f:
                status = f.read().strip()
            m = re.fullmatch(r"unfinished (\d+)/\d+ (.*)", status)
            assert m, (status, run.text[-4000:])
            results.append({"how": how, "took": took, "saved": int(m.group(1)), "reason": m.group(2),
                            "text": run.text, "runner_rc": run.proc.returncode, "latest": C.latest(save),
                            "steps": C.step_names(save), "leftovers": C.leftovers(save), "from": start_from})
            print(f"\n[runner signals] {how}: every process on both hosts gone {took:.1f} s after it; "
                  f"iterations {start_from} -> {results[-1]['saved']} kept ({results[-1]['reason']})", file=sys.stderr)
            file_checks.verify_step_files(os.path.join(save, C.latest(save)))  # complete: every file of every rank
        ref_out = train_runs.finish(ref, timeout=400).stdout
    finally:
        if ref.poll() is None:
            os.killpg(ref.pid, signal.SIGKILL)
    assert ref.returncode == 0, ref_out[-4000:]
    assert results[-1]["saved"] <= REFERENCE_ITERS, results[-1]["saved"]
    return results, _losses(ref_out)


def test_dropped_ssh_sessions_every_rank_saves_and_exits(stopped_runs):
    results, _ = stopped_runs
    r = results[0]
    assert r["reason"] == "the output channel closed (stdout: Broken pipe)", r["text"][-4000:]
    assert r["latest"] == f"global_step{r['saved']}" and r["leftovers"] == []
    assert "Traceback" not in r["text"], r["text"][-4000:]


@pytest.mark.parametrize("index, how", [(1, "SIGTERM"), (2, "SIGINT")])
def test_signal_to_the_runner_every_rank_saves_and_exits(stopped_runs, index, how):
    results, _ = stopped_runs
    r = results[index]
    assert r["saved"] > r["from"] + 1
    assert r["latest"] == f"global_step{r['saved']}" and r["leftovers"] == []
    assert r["steps"] == [f"global_step{x['saved']}" for x in results[:index + 1]]  # nothing lost or overwritten
    # the ranks were told by their per-host launcher (SIGTERM), or noticed the output channel close first
    assert r["reason"] in ("signal SIGTERM", "the output channel closed (stdout: Broken pipe)"), r["reason"]
    assert f"> training from iteration {r['from']} to {ITERS}" in r["text"], r["text"][-4000:]
    assert C.error_lines(r["text"]) == [] and "Traceback" not in r["text"], r["text"][-4000:]


def test_resumes_continue_the_uninterrupted_trajectory(stopped_runs):
    results, reference = stopped_runs
    seen = {}
    for r in results:
        losses = _losses(r["text"])
        assert min(losses) == r["from"] + 1, sorted(losses)  # each run starts where the previous one saved
        seen.update({i: v for i, v in losses.items() if i <= r["saved"]})
    # the lines printed after a channel closed are lost; every run printed at least its first two iterations
    assert set(seen) <= set(reference) and len(seen) >= 2 * len(results), (sorted(seen), sorted(reference))
    worst = max(abs(seen[i] - reference[i]) for i in seen)
    assert worst <= TOLERANCE, {i: (seen[i], reference[i]) for i in seen}
