"""Never unsupervised, never hung: SIGTERM to the launcher (torchrun, the deepspeed runner, srun), a second
job on the same --save, and a rank stopped with SIGSTOP (two ranks, tiny model; every pid checked gone)."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.helpers import ops_checks as C
from tests.helpers import train_runs
from tests.unit.test_launch import slurm_cluster  # noqa: F401 - the local Slurm cluster fixture

pytestmark = pytest.mark.slow

ARGS = train_runs.TINY_MODEL + ["--micro-batch-size", "1", "--global-batch-size", "4", "--lr", "1e-3", "--mock-data",
                                "--vocab-size", "100", "--log-interval", "1", "--eval-iters", "0"]
RANK_OUTPUT = C.RANK_OUTPUT


class _Job:
    """A launcher started in its own session, its output collected by a thread (so it never blocks)."""

    def __init__(self, cmd, nranks):
        self.proc = train_runs.start(cmd)
        self.lines = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.ranks = C.rank_processes(self.proc.pid, nranks) if nranks else []  # srun: the tasks run under slurmd

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def text(self):
        return "".join(self.lines)

    def wait_for(self, needle, timeout=240):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if needle in self.text:
                return
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.2)
        raise AssertionError(f"never saw {needle!r}:\n{self.text[-4000:]}")

    def finish(self, timeout):
        self.proc.wait(timeout=timeout)
        self._reader.join(timeout=timeout)

    def kill(self):
        for p in self.ranks:
            try:
                p.kill()
            except Exception:  # noqa: BLE001 - already gone
                pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)


def test_second_job_refused_then_sigterm_to_torchrun_saves_and_exits(tmp_path):
    save = str(tmp_path / "ckpt")
    job = _Job(train_runs.torchrun(2, ARGS + ["--train-iters", "100000", "--save", save, "--save-interval", "100000"]),
               2)
    try:
        job.wait_for("iteration        2/")
        # a second job on the same --save: refused at start, naming the holder (rank 0 of the first job)
        second = train_runs.run([sys.executable, train_runs.SCRIPT] + ARGS + ["--train-iters", "4", "--save", save],
                                timeout=240)
        assert second.returncode == 2, second.stdout[-3000:]
        line = C.assert_one_error_line(second.stdout)
        assert line.startswith(f"pretrain_tokenformer.py: error: --save {save} is in use by another run "
                               f"(host {socket.gethostname()}, pid {job.ranks[0].pid}, since "), line
        assert job.proc.poll() is None                     # the first job goes on
        pids = [job.proc.pid] + [p.pid for p in job.ranks]
        os.kill(job.proc.pid, signal.SIGTERM)              # torchrun passes SIGTERM on to every rank
        job.finish(timeout=120)
        C.wait_gone(pids, 60)
    finally:
        job.kill()
    text = job.text
    m = re.search(r"exiting at iteration (\d+) \(signal SIGTERM\)", text)
    assert m, text[-4000:]
    stopped = int(m.group(1))
    assert f"> done: iteration {stopped}," in text          # rank 0 returned normally (exit 0)
    assert C.latest(save) == f"global_step{stopped}" and C.step_names(save) == [f"global_step{stopped}"]
    assert C.leftovers(save) == [] and C.error_lines(text) == []
    assert not RANK_OUTPUT.search(text) and "ChildFailedError" not in text, text[-4000:]


def test_sigterm_to_deepspeed_runner_saves_and_every_rank_exits(tmp_path):
    save = str(tmp_path / "ckpt")
    runner = shutil.which("deepspeed", path=train_runs.VENV_BIN + os.pathsep + os.environ.get("PATH", ""))
    assert runner, "the deepspeed launcher (installed with deepspeed) is missing"
    job = _Job([runner, "--num_gpus", "2", "--master_port", str(train_runs.free_port()), train_runs.SCRIPT] + ARGS
               + ["--train-iters", "100000", "--save", save, "--save-interval", "100000"], 2)
    try:
        launch = job.ranks[0].parent()                     # python -m deepspeed.launcher.launch
        job.wait_for("iteration        2/")
        pids = [job.proc.pid, launch.pid] + [p.pid for p in job.ranks]
        os.kill(job.proc.pid, signal.SIGTERM)              # kills the runner alone (its default action)
        assert job.proc.wait(timeout=30) == -signal.SIGTERM
        C.wait_gone(pids, 90)                              # the ranks saw it, saved and ended; so did launch
        job._reader.join(timeout=30)
    finally:
        job.kill()
    text = job.text
    # whichever rank noticed first: rank 0 names the kind of request (with its own detail, or the rank that
    # noticed), and the rank that noticed names the launcher process that ended -- the runner
    m = re.search(r"exiting at iteration (\d+) \(the launcher ended", text)
    assert m, text[-4000:]
    assert {int(p) for p in re.findall(r"the launcher ended \(pid (\d+):", text)} == {job.proc.pid}, text[-4000:]
    stopped = int(m.group(1))
    assert f"> done: iteration {stopped}," in text
    assert C.latest(save) == f"global_step{stopped}" and C.leftovers(save) == []
    assert C.error_lines(text) == [] and "Traceback" not in text, text[-4000:]


def test_stopped_rank_ends_the_run_within_the_timeout():
    timeout_s = 12.0   # small, but above the start-up skew of two ranks on a loaded machine
    job = _Job(train_runs.torchrun(2, ARGS + ["--train-iters", "100000", "--distributed-timeout-minutes",
                                              str(timeout_s / 60)]), 2)
    try:
        job.wait_for("iteration        2/")
        pids = [job.proc.pid] + [p.pid for p in job.ranks]
        os.kill(job.ranks[1].pid, signal.SIGSTOP)
        stopped_at = time.time()
        job.wait_for("pretrain_tokenformer.py: error:", timeout=120)
        noticed = time.time() - stopped_at
        job.finish(timeout=120)                            # torchrun then ends the stopped rank (after its 30 s grace)
        ended = time.time() - stopped_at
        C.wait_gone(pids, 30)
    finally:
        job.kill()
    assert job.proc.returncode != 0
    lines = C.error_lines(job.text)
    assert len(lines) == 1, job.text[-4000:]
    assert lines[0].startswith("pretrain_tokenformer.py: error: rank 0: a collective failed (") and \
        lines[0].endswith("rank 1 stopped answering or ended (collectives are bounded by "
                          "--distributed-timeout-minutes 0.2)"), lines[0]
    assert not RANK_OUTPUT.search(job.text), job.text[-4000:]
    # the collective timeout + the diagnosis barrier (each 12 s), with room for a loaded machine
    assert noticed < 2 * timeout_s + 30, noticed
    assert ended < 2 * timeout_s + 30 + 60, ended


@pytest.mark.slurm
def test_scancel_signal_to_an_srun_step_saves_and_exits(slurm_cluster, tmp_path):  # noqa: F811 - the fixture
    """SIGTERM to srun itself makes Slurm end the step with SIGKILL ("srun: forcing job termination"):
    no process can save then. The signal that reaches the tasks is Slurm's own: scancel --signal=TERM."""
    save = str(tmp_path / "ckpt")
    name = f"ops-{os.getpid()}-{int(time.time())}"
    job = _Job(["srun", "-n", "2", "--job-name", name, "--kill-on-bad-exit=1", sys.executable, train_runs.SCRIPT]
               + ARGS + ["--train-iters", "100000", "--save", save, "--save-interval", "100000"], 0)
    try:
        job.wait_for("iteration        2/")
        out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True, text=True, timeout=30)
        job_id = out.stdout.split()[0]
        subprocess.run(["scancel", "--signal=TERM", job_id], check=True, timeout=30)
        job.finish(timeout=120)
    finally:
        job.kill()
    text = job.text
    assert job.proc.returncode == 0, text[-4000:]
    m = re.search(r"exiting at iteration (\d+) \(signal SIGTERM\)", text)
    assert m, text[-4000:]
    stopped = int(m.group(1))
    assert f"> done: iteration {stopped}," in text
    assert C.latest(save) == f"global_step{stopped}" and C.leftovers(save) == []
    assert C.error_lines(text) == [] and "Traceback" not in text, text[-4000:]


def test_closed_stdout_saves_and_exits(tmp_path):
    """The reader of a rank's stdout goes away (a dropped ssh session, a killed `tee`): the next log line
    fails with EPIPE; the rank drops it, saves and exits 0 instead of dying of BrokenPipeError."""
    save, status, err = str(tmp_path / "ckpt"), str(tmp_path / "exit_status"), tmp_path / "stderr.txt"
    with open(err, "w") as err_file:
        proc = subprocess.Popen([sys.executable, train_runs.SCRIPT] + ARGS
                                + ["--train-iters", "100000", "--save", save, "--save-interval", "100000",
                                   "--exit-status-file", status],
                                cwd=train_runs.ROOT, env=train_runs.env(), stdout=subprocess.PIPE, stderr=err_file,
                                text=True, start_new_session=True)
    try:
        for line in proc.stdout:
            if line.startswith(" iteration        2/"):
                break
        proc.stdout.close()                                # nobody reads the rank's output any more
        assert proc.wait(timeout=120) == 0, err.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    with open(status) as f:
        m = re.fullmatch(r"unfinished (\d+)/100000 the output channel closed \(stdout: Broken pipe\)\n", f.read())
    assert m, open(status).read()
    stopped = int(m.group(1))
    assert stopped >= 3                                    # the first failed line is iteration 3's
    assert C.latest(save) == f"global_step{stopped}" and C.step_names(save) == [f"global_step{stopped}"]
    assert C.leftovers(save) == [] and "Traceback" not in err.read_text(), err.read_text()[-4000:]
