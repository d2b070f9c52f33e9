"""A multi-node Slurm cluster on simulated hosts (tests/helpers/multihost.py), for multi-node tests.

One ``slurmd`` per host, started in the host's network and UTS namespaces with ``nsenter`` (not
``ip netns exec``, which remounts /sys and hides the cgroup hierarchies: slurmd then refuses to
start) and named after the host (``slurmd -N <host>``); ``slurmctld`` on the first host (the head
node, also a compute node), reachable by every host over the bridge; its own ``munged`` (own key,
own socket, named in slurm.conf's AuthInfo), its own slurm.conf (clients find it through
``SLURM_CONF``; /etc/slurm is never read or written), its own state, spool and log folder. The
daemons listen on Slurm's default ports, but inside the hosts' namespaces, so a cluster on the
machine itself (../shared/slurm's one-node cluster) does not clash with it. Nothing in the root
network namespace can reach the hosts: run client commands on a host (:meth:`SlurmCluster.run`).

Usage::

    with MultiHost(2) as mh, SlurmCluster(mh) as cluster:
        job = cluster.sbatch(["--nodes", "2", "script.sbatch"])
        cluster.run(["squeue"]).stdout
        cluster.kill_node(mh.hosts[1]); cluster.revive_node(mh.hosts[1])

Everything (daemons, folder) goes on :meth:`close`, which also runs on an exception in ``with``.
``unavailable_reason()`` gives the one-line reason to skip where the Slurm and munge daemons are not
installed (``.ci/run`` installs them)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Dict, Optional, Sequence

from tests.helpers import multihost, slurm_jobs

DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel")
PATHS = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")


def _which(name: str) -> Optional[str]:
    found = shutil.which(name)
    if found:
        return found
    for d in PATHS:
        if os.access(os.path.join(d, name), os.X_OK):
            return os.path.join(d, name)
    return None


def unavailable_reason() -> Optional[str]:
    """One line saying why a cluster cannot be started here, or None."""
    reason = multihost.unavailable_reason()
    if reason:
        return reason
    missing = [d for d in DAEMONS if _which(d) is None]
    if missing:
        return (f"a Slurm cluster needs {', '.join(missing)} "
                f"(apt-get install slurmctld slurmd slurm-client munge)")
    return None


class SlurmCluster(slurm_jobs.SlurmClient):
    """Slurm over the hosts of ``mh`` (a started :class:`multihost.MultiHost`); see the module docstring.

    ``cpus``: CPUs each node advertises (more than the machine has: jobs share the cores).
    ``slurmd_timeout``: seconds without an answer before slurmctld declares a node DOWN (its jobs
    end NODE_FAIL and ``--requeue`` jobs go back to the queue). ``slurmd_debug``: slurmd's log level
    (``debug`` logs every RPC a node handles; see :meth:`slurmd_log`). ``requeue_hold``: seconds a
    requeued job waits before it may start again (AuthInfo cred_expire; Slurm's default is 120). Keep it
    above 60 s when a node may come back: Slurm retries a message to an unreachable node 60 s later,
    and a retried kill of a lost job step would kill the requeued job's new step (same job and step id)."""

    def __init__(self, mh: multihost.MultiHost, cpus: int = 4, slurmd_timeout: int = 20,
                 slurmd_debug: str = "info", requeue_hold: int = 120):
        super().__init__()
        self.mh = mh
        self.name = mh.tag  # ClusterName: the tasks' SLURM_CLUSTER_NAME
        self.slurmd_debug = slurmd_debug
        self.requeue_hold = requeue_hold
        self.hosts = list(mh.hosts)
        self.head = self.hosts[0]
        self.cpus = cpus
        self.slurmd_timeout = slurmd_timeout
        self.dir = ""
        self.conf = ""
        self._procs: Dict[str, subprocess.Popen] = {}
        self._closed = False

    # ---- life cycle -------------------------------------------------------------------------------
    def __enter__(self) -> "SlurmCluster":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self, timeout: float = 120) -> None:
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        self.dir = tempfile.mkdtemp(prefix=f"{self.mh.tag}-slurm-")
        os.chmod(self.dir, 0o711)  # munged wants every folder above its socket searchable by all
        for sub, mode in (("munge", 0o700), ("run", 0o755), ("state", 0o700), ("log", 0o755)):
            os.mkdir(os.path.join(self.dir, sub), mode)
        key = os.path.join(self.dir, "munge", "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        self.munge_socket = os.path.join(self.dir, "run", "munge.socket")
        self._procs["munged"] = self._spawn(
            None, [_which("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
                   f"--key-file={key}", f"--pid-file={self.dir}/run/munged.pid",
                   f"--log-file={self.dir}/log/munged.log", f"--seed-file={self.dir}/munge/seed"], "munged")
        self._wait(lambda: os.path.exists(self.munge_socket), 30, "munged's socket")
        self.conf = os.path.join(self.dir, "slurm.conf")
        with open(self.conf, "w") as f:
            f.write(self.slurm_conf())
        self._procs["slurmctld"] = self._spawn(self.head, [_which("slurmctld"), "-D", "-c", "-f", self.conf],
                                               "slurmctld")
        for h in self.hosts:
            self.start_slurmd(h, wait=False)
        self.wait_idle(timeout)

    def slurm_conf(self) -> str:
        d = self.dir
        mem = 1024
        nodes = "\n".join(f"NodeName={h.name} NodeAddr={h.ip} CPUs={self.cpus} RealMemory={mem} State=UNKNOWN"
                          for h in self.hosts)
        return f"""# written by tests/helpers/slurm_cluster.py for simulated hosts {self.mh.tag}
ClusterName={self.name}
SlurmctldHost={self.head.name}({self.head.ip})
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire={self.requeue_hold}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool-%n
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# look at pending jobs every few seconds (a released or requeued job starts soon after it may)
SchedulerParameters=sched_interval=5,bf_interval=5
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
SlurmdTimeout={self.slurmd_timeout}
SlurmdDebug={self.slurmd_debug}
KillWait=5
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
{nodes}
PartitionName=sim Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""

    def close(self) -> None:
        """Cancel every job, stop every daemon (by the processes this object started), remove the folder."""
        if self._closed:
            return
        self._closed = True
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            with contextlib.suppress(Exception):
                self.run(["scancel", "--full", "--user=root"], timeout=30)
                self._wait(lambda: not self.run(["squeue", "-h"], timeout=30).stdout.strip(), 30, "jobs to end")
        for name in sorted(self._procs, key=lambda n: (n == "munged", n == "slurmctld")):
            p = self._procs[name]
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        # job steps left behind by a daemon that died (their slurmstepd is gone with the host's processes)
        for h in self.hosts:
            for pid in self.mh.pids(h):
                with contextlib.suppress(OSError):
                    if "slurmstepd" in open(f"/proc/{pid}/comm").read():
                        os.kill(pid, signal.SIGKILL)
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    # ---- daemons ----------------------------------------------------------------------------------
    def _spawn(self, host: Optional[multihost.Host], argv: Sequence[str], name: str) -> subprocess.Popen:
        log = open(os.path.join(self.dir, "log", f"{name}.out"), "ab")
        cmd = list(argv) if host is None else self.mh.wrap(host, argv)
        try:
            return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, env=self.env())
        finally:
            log.close()

    def start_slurmd(self, host: multihost.Host, wait: bool = True) -> None:
        """(Re)start ``host``'s slurmd (after :meth:`kill_node` the node comes back: ReturnToService=2)."""
        old = self._procs.pop(f"slurmd-{host.name}", None)
        if old is not None and old.poll() is None:
            old.kill()
            old.wait()
        self._procs[f"slurmd-{host.name}"] = self._spawn(host, [_which("slurmd"), "-D", "-f", self.conf,
                                                                "-N", host.name], f"slurmd-{host.name}")
        if wait:
            self.wait_idle()

    def kill_node(self, host: multihost.Host) -> None:
        """The node dies: every process of ``host`` (slurmd, slurmstepd, the tasks, sshd) is SIGKILLed."""
        assert host is not self.head, "the head node runs slurmctld; kill a compute node"
        self.mh.kill_host(host)
        proc = self._procs.get(f"slurmd-{host.name}")
        if proc is not None:
            proc.wait(timeout=10)

    def revive_node(self, host: multihost.Host) -> None:
        """``host`` boots again: its sshd and slurmd start; waits until the node takes jobs."""
        self.mh.start_sshd(host)
        self.start_slurmd(host)

    def slurmd_log(self, host: multihost.Host) -> str:
        """The slurmd log of ``host`` so far."""
        return slurm_jobs.read(os.path.join(self.dir, "log", f"slurmd-{host.name}.log"))

    def node_states(self) -> Dict[str, str]:
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], timeout=30).stdout
        return dict(line.split() for line in out.splitlines() if len(line.split()) == 2)

    def wait_idle(self, timeout: float = 120) -> None:
        """Wait until every node is up and idle (a down node is resumed)."""
        def ready():
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited {proc.returncode}: {self._log_tail(name)}")
            states = self.node_states()
            for name, state in states.items():
                if state.startswith(("down", "drain", "drng")) and f"slurmd-{name}" in self._procs:
                    self.run(["scontrol", "update", f"NodeName={name}", "State=RESUME"], timeout=30)
            return len(states) == len(self.hosts) and all(s in ("idle", "mix", "alloc") for s in states.values())
        self._wait(ready, timeout, f"{len(self.hosts)} idle nodes")

    def _log_tail(self, name: str) -> str:
        tails = []
        for log in (f"{name}.out", f"{name}.log"):
            path = os.path.join(self.dir, "log", log)
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    tails.append(f.read()[-1500:])
        return "\n".join(tails)

    def _wait(self, predicate, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while not predicate():
            if time.time() > deadline:
                raise RuntimeError(f"Slurm cluster: timed out after {timeout:.0f} s waiting for {what}\n"
                                   f"{self._log_tail('slurmctld')}")
            time.sleep(0.3)

    # ---- clients ----------------------------------------------------------------------------------
    def env(self, extra: Optional[Dict[str, str]] = None, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        """``base`` (default os.environ) with SLURM_CONF naming this cluster and Slurm's programs on PATH;
        jobs submitted with it (``--export=ALL``) pass SLURM_CONF on to their own scontrol/srun calls."""
        e = dict(os.environ if base is None else base)
        if self.conf:
            e["SLURM_CONF"] = self.conf
        e["PATH"] = e.get("PATH", "") + os.pathsep + os.pathsep.join(PATHS)
        for key in [k for k in e if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF"]:
            del e[key]  # a test run from inside a job must not hand its job's variables on
        if extra:
            e.update(extra)
        return e

    def run(self, argv: Sequence[str], timeout: float = 60, env: Optional[Dict[str, str]] = None,
            cwd: Optional[str] = None) -> subprocess.CompletedProcess:
        """Run a client command (sbatch, scontrol, ...) on the head node (stdout and stderr apart)."""
        return self.mh.run(self.head, argv, timeout=timeout, env=env or self.env(), cwd=cwd)
