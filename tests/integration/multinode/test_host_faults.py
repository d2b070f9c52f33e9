"""A host dies in the middle of a 2-host x 2-rank run (torchrun, data parallel across the hosts,
``--distributed-timeout-minutes 0.5``, a checkpoint every 10 iterations), and the ``--save`` lock
across hosts.

* **Every process of a host SIGKILLed** (``MultiHost.kill_host``: its ranks, its launcher, its sshd):
  the other host's ranks end non-zero, one error line naming the lost host and its ranks; no process of
  the job is left on either host; ``latest`` names a complete step folder, no ``.partial`` folder is
  published.
* **A host's link cut** (its bridge port down: packets dropped silently, no reset reaches anyone): both
  sides time out and end non-zero, each naming the other host; same checks. This one runs on a second
  harness instance, side by side with the first (both are mostly waiting).
* **The ``--save`` lock across hosts**: while the link-cut job runs (its rank 0 on the first host holds
  the lock), a second job on the second host with the same ``--save`` is refused in one line naming
  the holder's host and pid -- the pid of a live rank on the first host.

The bound checked is the one documented in docs/multinode.md: the collective timeout plus the
diagnosis window (at most the timeout again), plus slack for this shared 2-core machine -- a hang
check, the measured times are printed.
"""

import os
import re
import signal
import sys
import threading
import time

import pytest

from megatron_tokenformer.checkpointing import file_checks
from megatron_tokenformer.checkpointing.format import files as checkpoint_files
from tests.helpers import multihost, train_runs

pytestmark = pytest.mark.slow

TIMEOUT_MIN = 0.5
TRAIN = train_runs.TINY_MODEL + ["--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", "100000",
                                 "--lr", "1e-3", "--mock-data", "--vocab-size", "100", "--log-interval", "1",
                                 "--eval-iters", "0", "--seed", "5", "--save-interval", "10",
                                 "--distributed-timeout-minutes", str(TIMEOUT_MIN)]
EXIT_BOUND = 2 * TIMEOUT_MIN * 60 + 60   # timeout + diagnosis window + slack: anything longer is a hang
START_TIMEOUT = 240


class Job:
    """The processes of one job on the simulated hosts, their output lines with arrival times, exit times."""

    def __init__(self, procs):
        self.procs = procs                       # [(host, Popen)]
        self.lines = []                          # [(time, host name, line)]
        self.ended = {}                          # host name -> time its launcher exited
        self._threads = [threading.Thread(target=self._read, args=(h, p), daemon=True) for h, p in procs]
        for t in self._threads:
            t.start()

    def _read(self, host, proc):
        for line in proc.stdout:
            self.lines.append((time.time(), host.name, line.rstrip("\n")))
        proc.wait()
        self.ended[host.name] = time.time()

    def text(self, host=None):
        return "\n".join(l for _, h, l in self.lines if host is None or h == host.name)

    def wait_for(self, pattern, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if re.search(pattern, self.text(), re.MULTILINE):
                return
            if all(p.poll() is not None for _, p in self.procs):
                break
            time.sleep(0.2)
        raise AssertionError(f"no /{pattern}/ after {timeout} s\n{self.text()[-5000:]}")

    def wait(self, host, timeout):
        proc = dict((h.name, p) for h, p in self.procs)[host.name]
        try:
            proc.wait(timeout=timeout)
        except Exception:
            self.kill()
            raise AssertionError(f"{host.name}: still running {timeout} s after the fault\n{self.text()[-5000:]}")
        for t in self._threads:
            t.join(timeout=10)
        return proc.returncode

    def kill(self):
        for _, p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)


def _torchrun_job(mh, save):
    port = str(train_runs.free_port())
    env = mh.env(base=train_runs.env())
    return Job([(h, mh.popen(h, [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank",
                                 str(h.index), "--nproc-per-node", "2", "--master-addr", mh.hosts[0].name,
                                 "--master-port", port, train_runs.SCRIPT] + TRAIN + ["--save", save], env=env))
                for h in mh.hosts])


def _job_pids(mh, host):
    """Processes of the training job still on ``host`` (launcher, ranks, their data-loader workers)."""
    out = []
    for pid in mh.pids(host):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if b"pretrain_tokenformer" in cmd or b"torch.distributed.run" in cmd or b"multiprocessing" in cmd:
            out.append(pid)
    return out


def _wait_no_job_pids(mh, host, timeout=30.0):
    """Data-loader workers notice their rank's end within a few seconds; nothing may stay longer."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        left = _job_pids(mh, host)
        if not left:
            return []
        time.sleep(0.5)
    return _job_pids(mh, host)


@pytest.fixture(scope="module")
def faults(two_hosts, tmp_path_factory):
    """Run both fault scenarios side by side (and the lock check inside the second); returns what they saw."""
    reason = multihost.unavailable_reason()
    if reason:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("host_faults")
    save_kill, save_cut = str(work / "save_kill"), str(work / "save_cut")
    result = {}
    with multihost.MultiHost(2) as mh_cut:
        jobs = {"kill": _torchrun_job(two_hosts, save_kill), "cut": _torchrun_job(mh_cut, save_cut)}
        c0, c1 = mh_cut.hosts
        lock_job = None
        try:
            # --- the --save lock: once rank 0 (first host) holds it ("> hosts:" follows the lock), a job
            # on the second host, started while the first job warms up and finished while it waits
            # after the cut (its rank 0 holds the lock until it ends, a minute after the cut)
            jobs["cut"].wait_for(r"^> hosts: ", START_TIMEOUT)
            lock_job = mh_cut.popen(c1, [sys.executable, train_runs.SCRIPT] + TRAIN + ["--save", save_cut,
                                                                                       "--train-iters", "1"],
                                    env=train_runs.env())
            for job in jobs.values():
                job.wait_for(r"^ iteration\s+12/", START_TIMEOUT)        # past the first save
            holder_pids = set(_job_pids(mh_cut, c0))
            # --- the faults
            h0, h1 = two_hosts.hosts
            t_kill = time.time()
            two_hosts.kill_host(h1)
            t_cut = time.time()
            mh_cut.cut_link(mh_cut.hosts[1])
            result["kill"] = {"rc": jobs["kill"].wait(h0, EXIT_BOUND), "took": jobs["kill"].ended[h0.name] - t_kill,
                              "out": jobs["kill"].text(h0), "left": {h.name: _wait_no_job_pids(two_hosts, h)
                                                                      for h in two_hosts.hosts}}
            lock_out, _ = lock_job.communicate(timeout=START_TIMEOUT)
            result["lock"] = (lock_job.returncode, lock_out, holder_pids, c0.name, save_cut)
            rcs = [jobs["cut"].wait(c0, EXIT_BOUND), jobs["cut"].wait(c1, EXIT_BOUND)]
            result["cut"] = {"rc": rcs, "took": [jobs["cut"].ended[h.name] - t_cut for h in mh_cut.hosts],
                             "out": [jobs["cut"].text(h) for h in mh_cut.hosts],
                             "left": {h.name: _wait_no_job_pids(mh_cut, h) for h in mh_cut.hosts},
                             "names": (c0.name, c1.name)}
            mh_cut.restore_link(c1)
        finally:
            for job in jobs.values():
                job.kill()
            if lock_job is not None and lock_job.poll() is None:
                os.killpg(lock_job.pid, signal.SIGKILL)
                lock_job.wait()
            two_hosts.start_sshd(two_hosts.hosts[1])     # the shared hosts: both up for the next test
    result.update(save_kill=save_kill, save_cut=save_cut, hosts=[h.name for h in two_hosts.hosts])
    kept = [_latest_name(s) for s in (save_kill, save_cut)]
    print(f"\n[host faults] kill: survivors ended {result['kill']['took']:.1f} s after the kill, latest {kept[0]}; "
          f"cut: {result['cut']['took'][0]:.1f} s / {result['cut']['took'][1]:.1f} s after the cut, latest {kept[1]}",
          file=sys.stderr)
    return result


def _latest_name(save):
    try:
        return os.path.basename(checkpoint_files.resolve_step_dir(save) or "none")
    except (ValueError, OSError) as exc:
        return f"unreadable ({exc})"


def _error_lines(out):
    return [l for l in out.splitlines() if l.startswith("pretrain_tokenformer.py: error: ")]


def _check_save_dir(save):
    """``latest`` names a complete, published step folder; no half-written folder is published."""
    step = checkpoint_files.resolve_step_dir(save)
    assert step is not None and os.path.isdir(step), os.listdir(save)
    assert not step.endswith(checkpoint_files.PARTIAL_SUFFIX), step
    file_checks.verify_step_files(step)          # raises naming a truncated or missing file
    iteration = int(re.search(r"global_step(\d+)$", step).group(1))
    assert iteration >= 10 and iteration % 10 == 0, step
    return iteration


def test_host_killed_survivors_end_naming_it(faults):
    kill = faults["kill"]
    h0, h1 = faults["hosts"]
    assert kill["rc"] != 0, kill["out"][-3000:]
    assert kill["took"] <= EXIT_BOUND
    errors = _error_lines(kill["out"])
    assert any(f"host {h1}" in l and "2, 3" in l for l in errors), errors or kill["out"][-3000:]
    assert kill["left"] == {h0: [], h1: []}, kill["left"]
    _check_save_dir(faults["save_kill"])


def test_link_cut_both_sides_end_naming_the_other(faults):
    cut = faults["cut"]
    c0, c1 = cut["names"]
    assert all(rc != 0 for rc in cut["rc"]), cut["rc"]
    assert all(t <= EXIT_BOUND for t in cut["took"]), cut["took"]
    assert any(f"host {c1}" in l and "2, 3" in l for l in _error_lines(cut["out"][0])), cut["out"][0][-3000:]
    assert any(f"host {c0}" in l for l in _error_lines(cut["out"][1])), cut["out"][1][-3000:]
    assert cut["left"] == {c0: [], c1: []}, cut["left"]
    _check_save_dir(faults["save_cut"])


def test_save_lock_refuses_a_job_on_the_other_host(faults):
    returncode, out, holder_pids, holder_host, save = faults["lock"]
    assert returncode != 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    errors = _error_lines(out)
    assert len(errors) == 1 and f"--save {save} is in use by another run (host {holder_host}, pid " in errors[0], out
    pid = int(re.search(r"pid (\d+)", errors[0]).group(1))
    assert pid in holder_pids, (pid, holder_pids)   # a live process of the job on the first host
