"""examples/slurm/pretrain_cpu.sbatch on a two-node Slurm cluster (tests/helpers/slurm_cluster.py: one slurmd
per simulated host, slurmctld on the first): ``sbatch --nodes 2 --ntasks-per-node 1`` (data parallel across
the hosts) trains the same trajectory as the one-node job of the same layout, and the faults of a
multi-node job end well:

* the job reaches its time limit: Slurm's warning (SIGUSR1) reaches the tasks on both nodes, they save,
  the script requeues the job, and the restart finishes on the uninterrupted trajectory;
* ``scancel --signal=TERM``: every task on both nodes saves and exits 0 (the script then requeues the
  unfinished job, like a pre-empted one);
* a node dies (every process of host 1 SIGKILLed: slurmd, slurmstepd, its task): the task on the other
  node ends at once (its peer's connection resets; ``--distributed-timeout-minutes`` bounds a silent
  loss), Slurm declares the node DOWN after SlurmdTimeout and requeues the job (``--requeue``); once
  the node is back and Slurm's requeue hold has passed, the job starts again by itself, resumes from
  the last complete checkpoint and finishes on the trajectory.

The jobs run side by side so that their waits overlap: first the node loss beside the one-node reference
(on host 0, which survives); while the requeued job waits out Slurm's requeue hold, the two-node job, the
time-limit job and the SIGTERM job (the lost node's processes are gone by then). Each fault's timings
are printed (``-s`` shows them) and kept in ``MEASURED``.
"""

import os
import re
import signal
import sys
import threading
import time

import pytest

from tests.helpers import ops_checks as C
from tests.helpers import slurm_cluster as SC
from tests.helpers import slurm_jobs as S
from tests.helpers import train_runs

pytestmark = [pytest.mark.slurm, pytest.mark.slow,
              pytest.mark.skipif(SC.unavailable_reason() is not None, reason=str(SC.unavailable_reason()))]

SCRIPT = os.path.join(train_runs.ROOT, "examples", "slurm", "pretrain_cpu.sbatch")
ITERS = 40  # the node loss must come mid-run even on a fast machine (kill after step 5 + 2 iterations)
SAVE_INTERVAL = 5
EXTRA = "--num-workers 0 --eval-iters 0 --log-interval 1 --distributed-timeout-minutes 0.5 --seed 7"
MEASURED = {}


def _measure(name, value):
    MEASURED[name] = value
    print(f"[slurm multinode] {name}: {value}")


@pytest.fixture(scope="module")
def cluster(two_hosts):
    # a lost node is DOWN after ~12-16 s; a requeued job waits 75 s (> Slurm's 60 s message retry)
    with SC.SlurmCluster(two_hosts, cpus=8, slurmd_timeout=12, requeue_hold=75) as c:
        yield c


def _submit(cluster, workdir, name, nodes, tasks_per_node, iters=ITERS, nodelist=None):
    log, save = workdir / f"{name}.out", workdir / f"{name}-ckpt"
    args = ["--nodes", str(nodes), "--ntasks-per-node", str(tasks_per_node), "--time=30", "-J", name, "-o", str(log),
            f"--export=ALL,PYTHON={sys.executable},REPO={train_runs.ROOT},TRAIN_ITERS={iters},TP=1,"
            f"SAVE_DIR={save},SAVE_INTERVAL={SAVE_INTERVAL},EXTRA_ARGS={EXTRA}"]
    if nodelist:
        args.append(f"--nodelist={nodelist}")
    job = cluster.sbatch(args + [SCRIPT], env=cluster.env(base=train_runs.env({"OMP_NUM_THREADS": ""})),
                         cwd=str(workdir))
    return {"job": job, "log": str(log), "save": str(save)}


def _losses(text):
    return {r["iteration"]: r["lm loss"] for r in train_runs.parse_iterations(text)}


def _assert_on_trajectory(losses, reference, iterations):
    assert set(iterations) <= set(losses), (sorted(losses), iterations)
    worst = max(abs(losses[i] - reference[i]) for i in iterations)
    assert worst <= 1e-5, {i: (losses[i], reference[i]) for i in iterations}
    return worst


class _Driver(threading.Thread):
    """Runs one fault scenario's actions while the other jobs run (the waits overlap)."""

    def __init__(self, target):
        super().__init__(daemon=True)
        self._target_fn = target
        self.error = None

    def run(self):
        try:
            self._target_fn()
        except BaseException as e:  # reported by the test that joins it
            self.error = e

    def result(self, timeout):
        self.join(timeout)
        assert not self.is_alive(), "the scenario driver did not finish"
        if self.error is not None:
            raise self.error


def _lose_a_node(cluster, j, lost):
    """Kill every process of ``lost`` once job ``j`` trained past its first checkpoint; wait until the task
    on the other node has ended and Slurm has requeued the job; bring the host back."""
    job, log = j["job"], j["log"]
    try:
        polls = iter(range(1 << 30))
        # the log every 0.2 s; the job's state (scontrol on the head host) once a second
        S.wait(lambda: f"saved checkpoint {j['save']}/global_step{SAVE_INTERVAL} " in S.read(log)
               and f"iteration {SAVE_INTERVAL + 2:8d}/" in S.read(log)
               or next(polls) % 5 == 4 and cluster.job_state(job) in S.ENDED, 900,
               "the job to train past its first checkpoint", log, poll=0.2)
        killed_at = time.time()
        cluster.kill_node(lost)
        S.wait(lambda: "pretrain_tokenformer.py: error: rank 0" in S.read(log), 120, "the surviving task to end",
               log, poll=0.2)
        j["survivor_s"] = time.time() - killed_at
        # Slurm declares the node DOWN (SlurmdTimeout) and requeues the job (--requeue)
        S.wait(lambda: cluster.job_fields(job).get("Restarts") == "1" and cluster.job_state(job) == "PENDING",
               300, "Slurm to requeue the job", log)
        j["requeue_s"] = time.time() - killed_at
        j["node_state"] = cluster.node_states()[lost.name]
        j["kept"] = C.latest(j["save"])
    except BaseException as e:  # reported by the node-loss test; the other scenarios go on
        j["error"] = e
    finally:
        cluster.revive_node(lost)  # the host boots again (sshd, slurmd)
        j["revived_at"] = time.time()


@pytest.fixture(scope="module")
def side_by_side(cluster, tmp_path_factory):
    """First the node loss, beside the reference (1 node x 2 tasks, on host 0, which survives); while the
    requeued job waits out Slurm's requeue hold, the 2-node job, the time-limit job and the SIGTERM job
    run (their drivers act as soon as the jobs train)."""
    work = tmp_path_factory.mktemp("slurm2n")
    jobs = {"reference": _submit(cluster, work, "reference", 1, 2, nodelist=cluster.hosts[0].name),
            "node_loss": _submit(cluster, work, "node_loss", 2, 1)}
    _lose_a_node(cluster, jobs["node_loss"], cluster.hosts[1])
    jobs.update(two_nodes=_submit(cluster, work, "two_nodes", 2, 1),
                time_limit=_submit(cluster, work, "time_limit", 2, 1),
                sigterm=_submit(cluster, work, "sigterm", 2, 1, iters=100000))

    def time_limit():
        j = jobs["time_limit"]
        pids = S.wait_for_handlers(j["job"], 2, signal.SIGUSR1, 900, j["log"], cluster=cluster.name)
        j["signal_s"] = S.freeze_until_signalled(pids, lambda: cluster.cut_time_limit(j["job"], 120),
                                                 signal.SIGUSR1, 120, j["log"])
        t = time.time()
        S.wait(lambda: "requeueing job" in S.read(j["log"]) or cluster.job_state(j["job"]) in S.ENDED, 300,
               "the time-limit save and requeue", j["log"])
        j["save_s"] = time.time() - t
        S.wait(lambda: cluster.job_state(j["job"]) == "PENDING", 120, "the requeued job to be pending", j["log"])
        cluster.release(j["job"], time_limit_minutes=30)
        j["state"] = cluster.wait_ended(j["job"], 900, j["log"])

    def sigterm():
        j = jobs["sigterm"]
        S.wait(lambda: "iteration        3/" in S.read(j["log"]) or cluster.job_state(j["job"]) in S.ENDED, 900,
               "the SIGTERM job to train", j["log"])
        pids = S.rank_pids(j["job"], cluster.name)
        t = time.time()
        cluster.run(["scancel", "--signal=TERM", j["job"]], timeout=30)
        S.wait(lambda: "requeueing job" in S.read(j["log"]) or cluster.job_state(j["job"]) in S.ENDED, 300,
               "the SIGTERM save", j["log"])
        C.wait_gone(pids, 60)
        j["exit_s"] = time.time() - t
        j["pids"] = pids
        cluster.scancel(j["job"])  # it requeued itself (unfinished): end it for good
        j["state"] = cluster.wait_ended(j["job"], 120, j["log"])

    drivers = {"time_limit": _Driver(time_limit), "sigterm": _Driver(sigterm)}
    for d in drivers.values():
        d.start()
    yield jobs, drivers
    for j in jobs.values():
        cluster.scancel(j["job"])
    for d in drivers.values():
        d.join(60)


@pytest.fixture(scope="module")
def reference(cluster, side_by_side):
    jobs, _ = side_by_side
    j = jobs["reference"]
    assert cluster.wait_ended(j["job"], 900, j["log"]) in ("COMPLETED", "GONE"), S.read(j["log"])[-4000:]
    text = S.read(j["log"])
    assert "> launcher: slurm, world size 2 = TP 1 x PP 1 x CP 1 x DP 2" in text
    losses = _losses(text)
    assert sorted(losses) == list(range(1, ITERS + 1))
    return losses


def test_two_node_job_equals_the_one_node_job(cluster, side_by_side, reference):
    jobs, _ = side_by_side
    j = jobs["two_nodes"]
    assert cluster.wait_ended(j["job"], 900, j["log"]) in ("COMPLETED", "GONE"), S.read(j["log"])[-4000:]
    text = S.read(j["log"])
    hosts = [h.name for h in cluster.hosts]
    assert f"2 tasks on {hosts[0][:-1]}[0-1]" in text or f"2 tasks on {hosts[0]},{hosts[1]}" in text, text[:2000]
    assert "> launcher: slurm, world size 2 = TP 1 x PP 1 x CP 1 x DP 2" in text
    assert f"> exit status: finished {ITERS}/{ITERS}" in text
    _measure("2 nodes vs 1 node, largest loss difference",
             _assert_on_trajectory(_losses(text), reference, range(1, ITERS + 1)))


def test_time_limit_of_a_two_node_job_saves_requeues_and_finishes(cluster, side_by_side, reference):
    jobs, drivers = side_by_side
    drivers["time_limit"].result(1200)
    j = jobs["time_limit"]
    text = S.read(j["log"])
    assert j["state"] in ("COMPLETED", "GONE"), text[-4000:]
    stops = [int(m) for m in re.findall(r"> exit status: unfinished (\d+)/%d signal SIGUSR1" % ITERS, text)]
    assert len(stops) == 1 and 0 < stops[0] < ITERS, text[-4000:]
    stop = stops[0]
    assert f"requeueing job {j['job']}" in text and f"job {j['job']} (start 2)" in text
    assert [int(m) for m in re.findall(r"> training from iteration (\d+) to", text)] == [0, stop]
    assert f"> exit status: finished {ITERS}/{ITERS}" in text
    assert f"global_step{stop}" in C.step_names(j["save"])  # the warning's save
    _measure("time limit: Slurm's warning reached both tasks after (s)", round(j["signal_s"], 1))
    _measure("time limit: save + exit + requeue took (s)", round(j["save_s"], 1))
    _measure("time limit: iterations kept at the save", f"{stop}/{ITERS}")
    # the restart continues the uninterrupted trajectory (one log: --open-mode=append)
    _measure("time limit: largest loss difference after the restart",
             _assert_on_trajectory(_losses(text.split(f"job {j['job']} (start 2)")[1]), reference,
                                   range(stop + 1, ITERS + 1)))


def test_scancel_signal_term_saves_on_both_nodes_and_every_task_exits_0(cluster, side_by_side):
    jobs, drivers = side_by_side
    drivers["sigterm"].result(900)
    j = jobs["sigterm"]
    text = S.read(j["log"])
    m = re.search(r"> exit status: unfinished (\d+)/100000 signal SIGTERM", text)
    assert m, text[-4000:]
    stop = int(m.group(1))
    # srun returned 0 (every task exited 0; the script runs `set -e`), then the script requeued the job
    assert f"requeueing job {j['job']}" in text, text[-4000:]
    assert "srun: error" not in text and C.error_lines(text) == [], text[-4000:]
    assert len(j["pids"]) == 2
    # both data-parallel ranks wrote their part of the checkpoint of the iteration they stopped at
    assert C.latest(j["save"]) == f"global_step{stop}" and C.leftovers(j["save"]) == []
    files = os.listdir(os.path.join(j["save"], f"global_step{stop}"))
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
            "tokenformer_rng_rank_00000.pt", "tokenformer_rng_rank_00001.pt"} <= set(files), files
    _measure("scancel --signal=TERM: every task gone after (s)", round(j["exit_s"], 1))
    _measure("scancel --signal=TERM: iterations kept", stop)


def test_a_two_node_job_that_loses_a_node_resumes_from_the_last_checkpoint(cluster, side_by_side, reference):
    jobs, _ = side_by_side
    j = jobs["node_loss"]
    job, log = j["job"], j["log"]
    if "error" in j:
        raise j["error"]
    _measure("node loss: the task on the other node ended after (s)", round(j["survivor_s"], 1))
    _measure("node loss: Slurm requeued the job after (s)", round(j["requeue_s"], 1))
    assert j["node_state"].startswith("down"), j["node_state"]
    # no release: the requeued job starts by itself after the cluster's hold (see SlurmCluster's requeue_hold)
    assert cluster.wait_ended(job, 900, log) in ("COMPLETED", "GONE"), S.read(log)[-4000:]
    _measure("node loss: the restart finished after the node came back (s)", round(time.time() - j["revived_at"], 1))
    text = S.read(log)
    _measure("node loss: checkpoint kept", j["kept"])
    start = int(j["kept"][len("global_step"):])
    assert start > 0 and start % SAVE_INTERVAL == 0  # a periodic checkpoint, complete (it is `latest`)
    assert [int(m) for m in re.findall(r"> training from iteration (\d+) to", text)] == [0, start]
    assert f"> exit status: finished {ITERS}/{ITERS}" in text
    _measure("node loss: largest loss difference after the restart",
             _assert_on_trajectory(_losses(text.split(f"job {job} (start 2)")[1]), reference,
                                   range(start + 1, ITERS + 1)))
