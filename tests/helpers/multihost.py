"""N simulated hosts on this machine, for multi-node tests.

Each host is a network namespace (``ip netns``) plus a persistent UTS namespace (its own hostname),
joined by a veth pair to a bridge that this harness creates, with a private /24 that exists only
on that bridge: the bridge itself has no address and the hosts have no default route, so no
traffic leaves it. The hosts' names go into ``/etc/hosts`` (between marker lines, added and
removed under a lock so that several instances can run at once). Every host runs an ``sshd``
that lets root in with a key made for this run; the clients get it through an ssh config file
(``-F``) and an ``ssh`` wrapper first on ``PATH`` (pdsh, mpirun and DeepSpeed's runner all call
``ssh`` from ``PATH``), so the machine's own ``~/.ssh`` and ssh config are never touched. The
filesystem is the same on every host (a shared filesystem, as on a cluster).

Every name (namespaces, bridge, veths, hostnames, the /etc/hosts marker) carries a per-instance
tag, so several instances can run side by side. Everything is torn down on exit, on an
exception, on Ctrl-C, and (through a manifest under ``/run/tokenformer-multihost``) by the next
instance when the process that made it was killed outright.

Usage::

    with MultiHost(2) as mh:                       # or the pytest fixture below
        h0, h1 = mh.hosts
        mh.run(h1, ["hostname"]).stdout            # -> h1.name (runs in h1's netns + uts)
        p = mh.popen(h0, ["pdsh", "-w", f"{h0.name},{h1.name}", "hostname"], env=mh.env())
        mh.cut_link(h1); mh.restore_link(h1)       # unplug / replug h1's cable
        mh.kill_host(h1)                           # SIGKILL every process of h1 (its sshd too)
        mh.start_sshd(h1)                          # bring it back

``unavailable_reason()`` gives the one-line reason to skip where this cannot work (no root, no
``ip netns``, no sshd or pdsh), ``None`` otherwise.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from megatron_tokenformer.fileio import pid_alive

STATE_DIR = "/run/tokenformer-multihost"  # one manifest per live instance, and the /etc/hosts lock
HOSTS_FILE = "/etc/hosts"
SSHD = "/usr/sbin/sshd"
TOOLS = ("ip", "nsenter", "unshare", "ssh", "ssh-keygen", "pdsh")


@dataclass
class Host:
    index: int
    name: str      # hostname (UTS) and the name in /etc/hosts
    ip: str
    netns: str     # ip netns name; /run/netns/<netns>
    veth: str      # bridge-side end of the veth pair (in the root namespace)
    peer: str      # host-side end (inside the netns)
    uts: str       # bind-mounted UTS namespace file

    @property
    def netns_path(self) -> str:
        return f"/run/netns/{self.netns}"


def _sh(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    r = subprocess.run(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip()}")
    return r


_REASON: Optional[List[Optional[str]]] = None


def unavailable_reason() -> Optional[str]:
    """One line saying why simulated hosts cannot be made here, or None (probed once per process)."""
    global _REASON
    if _REASON is None:
        _REASON = [_probe()]
    return _REASON[0]


def _probe() -> Optional[str]:
    if os.geteuid() != 0:
        return "simulated hosts need root (network namespaces, bridges, /etc/hosts)"
    missing = [t for t in TOOLS if shutil.which(t) is None] + ([] if os.access(SSHD, os.X_OK) else ["sshd"])
    if missing:
        return (f"simulated hosts need {', '.join(missing)} (apt-get install iproute2 util-linux openssh-server "
                f"openssh-client pdsh)")
    name = f"mhprobe{os.getpid() % 100000}"
    r = _sh("ip", "netns", "add", name, check=False)
    if r.returncode != 0:
        return f"simulated hosts need network namespaces: 'ip netns add' failed: {r.stderr.strip()}"
    _sh("ip", "netns", "del", name, check=False)
    return None


@contextlib.contextmanager
def _locked(path: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _edit_hosts(tag: str, lines: Sequence[str]) -> None:
    """Replace this instance's block of /etc/hosts by ``lines`` (none: remove it). In place, under a
    lock (/etc/hosts is often a bind mount that cannot be replaced by a rename)."""
    begin, end = f"# >>> tokenformer-multihost {tag}", f"# <<< tokenformer-multihost {tag}"
    with _locked(os.path.join(STATE_DIR, "hosts.lock")):
        with open(HOSTS_FILE, "r+") as f:
            kept, inside = [], False
            for line in f.read().splitlines():
                if line == begin:
                    inside = True
                elif line == end:
                    inside = False
                elif not inside:
                    kept.append(line)
            if lines:
                kept += [begin, *lines, end]
            f.seek(0)
            f.write("\n".join(kept) + "\n")
            f.truncate()


def _netns_inode(path: str) -> Optional[int]:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def pids_in_netns(path: str) -> List[int]:
    """Every process whose network namespace is the one bind-mounted at ``path``."""
    ino = _netns_inode(path)
    if ino is None:
        return []
    want, me, pids = f"net:[{ino}]", os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            if os.readlink(f"/proc/{entry}/ns/net") == want and not _zombie(entry):
                pids.append(int(entry))
        except OSError:
            pass
    return pids


def _zombie(pid: str) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")


def _kill_netns(path: str, sig: int = signal.SIGKILL, wait: float = 10.0) -> None:
    deadline = time.time() + wait
    while True:
        pids = pids_in_netns(path)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if time.time() > deadline:
            raise RuntimeError(f"processes {pids} in {path} survive {signal.Signals(sig).name}")
        time.sleep(0.1)


def _teardown(manifest: Dict) -> List[str]:
    """Undo everything ``manifest`` records; returns the steps that failed (an empty list when clean)."""
    problems = []
    for h in manifest.get("hosts", []):
        try:
            _kill_netns(f"/run/netns/{h['netns']}")
        except RuntimeError as e:
            problems.append(str(e))
    for h in manifest.get("hosts", []):
        _sh("ip", "link", "del", h["veth"], check=False)
        if os.path.exists(f"/run/netns/{h['netns']}"):
            r = _sh("ip", "netns", "del", h["netns"], check=False)
            if r.returncode != 0:
                problems.append(f"ip netns del {h['netns']}: {r.stderr.strip()}")
        if os.path.exists(h["uts"]):
            _sh("umount", h["uts"], check=False)
            with contextlib.suppress(OSError):
                os.unlink(h["uts"])
    if manifest.get("bridge"):
        _sh("ip", "link", "del", manifest["bridge"], check=False)
    try:
        _edit_hosts(manifest["tag"], [])
    except OSError as e:
        problems.append(f"{HOSTS_FILE}: {e}")
    if manifest.get("tmpdir"):
        shutil.rmtree(manifest["tmpdir"], ignore_errors=True)
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(STATE_DIR, manifest["tag"] + ".json"))
    return problems


def cleanup_stale() -> List[str]:
    """Tear down the instances whose owning process is gone (killed before it could clean up); their tags."""
    done = []
    if not os.path.isdir(STATE_DIR):
        return done
    for entry in sorted(os.listdir(STATE_DIR)):
        if not entry.endswith(".json"):
            continue
        try:
            with open(os.path.join(STATE_DIR, entry)) as f:
                manifest = json.load(f)
        except (OSError, ValueError):
            continue
        if manifest.get("owner") != os.getpid() and not pid_alive(int(manifest.get("owner", 0))):
            _teardown(manifest)
            done.append(manifest["tag"])
    return done


def _used_subnets() -> set:
    """The 10.x.y /24 prefixes already routed or addressed here (root namespace and every netns)."""
    used = set()
    outs = [_sh("ip", "-o", "-4", "addr", check=False).stdout, _sh("ip", "-4", "route", check=False).stdout]
    for ns in _sh("ip", "netns", "list", check=False).stdout.split("\n"):
        if ns.strip():
            outs.append(_sh("ip", "-n", ns.split()[0], "-o", "-4", "addr", check=False).stdout)
    for out in outs:
        for word in out.split():
            if word.startswith("10.") and word.count(".") == 3:
                used.add(".".join(word.split("/")[0].split(".")[:3]))
    if os.path.isdir(STATE_DIR):  # instances still being built have no addresses yet
        for entry in os.listdir(STATE_DIR):
            with contextlib.suppress(OSError, ValueError, KeyError):
                with open(os.path.join(STATE_DIR, entry)) as f:
                    used.add(json.load(f)["subnet"])
    return used


class MultiHost:
    """``n`` simulated hosts (see the module docstring). A context manager; ``close()`` is idempotent."""

    def __init__(self, n: int = 2, prefix: str = "mh"):
        assert 1 <= n <= 200
        self.n = n
        self.tag = prefix + uuid.uuid4().hex[:6]          # <= 8 chars: interface names stay <= 15
        self.hosts: List[Host] = []
        self.bridge = f"{self.tag}br"
        self.tmpdir = ""
        self.subnet = ""
        self._sshd: Dict[int, subprocess.Popen] = {}
        self._closed = False

    # ---- life cycle -------------------------------------------------------------------------------
    def __enter__(self) -> "MultiHost":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _manifest(self) -> Dict:
        return {"tag": self.tag, "owner": os.getpid(), "subnet": self.subnet, "bridge": self.bridge,
                "tmpdir": self.tmpdir, "hosts": [h.__dict__ for h in self.hosts]}

    def _save_manifest(self) -> None:
        os.makedirs(STATE_DIR, exist_ok=True)
        path = os.path.join(STATE_DIR, self.tag + ".json")
        with open(path + ".tmp", "w") as f:
            json.dump(self._manifest(), f)
        os.replace(path + ".tmp", path)

    def start(self) -> None:
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        cleanup_stale()
        atexit.register(self.close)  # an interpreter that exits without __exit__ still tears down
        self.tmpdir = tempfile.mkdtemp(prefix=f"{self.tag}-")
        os.chmod(self.tmpdir, 0o755)
        with _locked(os.path.join(STATE_DIR, "subnet.lock")):
            used = _used_subnets()
            free = [f"10.{a}.{b}" for a in range(200, 250) for b in range(1, 255) if f"10.{a}.{b}" not in used]
            self.subnet = random.choice(free)
            self.hosts = [Host(index=i, name=f"{self.tag}-n{i}", ip=f"{self.subnet}.{i + 10}",
                               netns=f"{self.tag}-n{i}", veth=f"{self.tag}v{i}", peer=f"{self.tag}p{i}",
                               uts=os.path.join(STATE_DIR, f"{self.tag}-n{i}.uts")) for i in range(self.n)]
            self._save_manifest()  # from here on, a killed owner is cleaned up by the next instance
        _sh("ip", "link", "add", self.bridge, "type", "bridge")
        _sh("ip", "link", "set", self.bridge, "up")
        for h in self.hosts:
            _sh("ip", "netns", "add", h.netns)
            _sh("ip", "link", "add", h.veth, "type", "veth", "peer", "name", h.peer)
            _sh("ip", "link", "set", h.peer, "netns", h.netns)
            _sh("ip", "link", "set", h.veth, "master", self.bridge)
            _sh("ip", "link", "set", h.veth, "up")
            _sh("ip", "-n", h.netns, "addr", "add", f"{h.ip}/24", "dev", h.peer)
            _sh("ip", "-n", h.netns, "link", "set", h.peer, "up")
            _sh("ip", "-n", h.netns, "link", "set", "lo", "up")
            with open(h.uts, "w"):
                pass
            _sh("unshare", f"--uts={h.uts}", "hostname", h.name)
        _edit_hosts(self.tag, [f"{h.ip}\t{h.name}" for h in self.hosts])
        self._write_ssh_files()
        for h in self.hosts:
            self.start_sshd(h, wait=False)
        for h in self.hosts:
            self._wait_ssh(h)

    def close(self) -> None:
        """Kill every process of every host, remove namespaces, veths, bridge, /etc/hosts lines, temp dir."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        for p in self._sshd.values():
            with contextlib.suppress(OSError):
                p.kill()
        problems = _teardown(self._manifest())
        for p in self._sshd.values():
            with contextlib.suppress(Exception):
                p.wait(timeout=5)
        if problems:
            raise RuntimeError("multi-host teardown incomplete: " + "; ".join(problems))

    # ---- ssh --------------------------------------------------------------------------------------
    def _write_ssh_files(self) -> None:
        d = self.tmpdir
        self.key = os.path.join(d, "id_ed25519")
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{self.tag}-root", "-f", self.key)
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", os.path.join(d, "ssh_host_ed25519_key"))
        shutil.copy(self.key + ".pub", os.path.join(d, "authorized_keys"))
        self.ssh_config = os.path.join(d, "ssh_config")
        with open(self.ssh_config, "w") as f:
            f.write(f"Host *\n  User root\n  IdentityFile {self.key}\n  IdentitiesOnly yes\n"
                    f"  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  GlobalKnownHostsFile /dev/null\n"
                    f"  BatchMode yes\n  LogLevel ERROR\n  ConnectTimeout 10\n"
                    f"  ServerAliveInterval 5\n  ServerAliveCountMax 3\n")
        self.bin_dir = os.path.join(d, "bin")
        os.makedirs(self.bin_dir)
        wrapper = os.path.join(self.bin_dir, "ssh")
        with open(wrapper, "w") as f:
            f.write(f"#!/bin/sh\nexec {shutil.which('ssh')} -F {shlex.quote(self.ssh_config)} \"$@\"\n")
        os.chmod(wrapper, 0o755)
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
        for h in self.hosts:
            with open(os.path.join(d, f"sshd_config.{h.index}"), "w") as f:
                f.write(f"ListenAddress {h.ip}:22\nHostKey {d}/ssh_host_ed25519_key\nPidFile {d}/sshd.{h.index}.pid\n"
                        f"AuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin prohibit-password\n"
                        f"PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
                        f"PrintMotd no\nMaxStartups 200\nMaxSessions 200\nLogLevel ERROR\n"
                        f"ClientAliveInterval 5\nClientAliveCountMax 3\n")

    def start_sshd(self, host: Host, wait: bool = True) -> None:
        """(Re)start ``host``'s sshd (after :meth:`kill_host`, the host comes back with it)."""
        old = self._sshd.pop(host.index, None)
        if old is not None and old.poll() is None:
            old.kill()
            old.wait()
        cfg = os.path.join(self.tmpdir, f"sshd_config.{host.index}")
        self._sshd[host.index] = subprocess.Popen(self.wrap(host, [SSHD, "-D", "-e", "-f", cfg]),
                                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                                  stderr=subprocess.DEVNULL, start_new_session=True)
        if wait:
            self._wait_ssh(host)

    def _wait_ssh(self, host: Host, timeout: float = 30.0) -> None:
        deadline, last = time.time() + timeout, ""
        while time.time() < deadline:
            r = self.run(host, self.ssh_cmd(host, "hostname"), timeout=20)
            if r.returncode == 0 and r.stdout.strip() == host.name:
                return
            last = (r.stdout + r.stderr).strip()
            if self._sshd[host.index].poll() is not None:
                raise RuntimeError(f"sshd on {host.name} exited {self._sshd[host.index].returncode}")
            time.sleep(0.2)
        raise RuntimeError(f"ssh to {host.name} does not answer after {timeout:.0f} s: {last}")

    def ssh_cmd(self, host: Host, remote: str) -> List[str]:
        """``ssh`` argv that runs the shell command ``remote`` on ``host`` (run it from inside any host)."""
        return [shutil.which("ssh"), "-F", self.ssh_config, host.name, remote]

    def env(self, extra: Optional[Dict[str, str]] = None, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        """``base`` (default os.environ) with the ssh wrapper first on PATH and pdsh set to use ssh."""
        e = dict(os.environ if base is None else base)
        e["PATH"] = self.bin_dir + os.pathsep + e.get("PATH", "")
        e["PDSH_RCMD_TYPE"] = "ssh"
        e["PDSH_SSH_ARGS_APPEND"] = f"-F {self.ssh_config}"
        if extra:
            e.update(extra)
        return e

    def mpirun_args(self) -> List[str]:
        """OpenMPI options that start the remote daemons with this run's ssh config."""
        return ["--mca", "plm_rsh_agent", shutil.which("ssh"), "--mca", "plm_rsh_args", f"-F {self.ssh_config}"]

    def hostfile(self, slots: int, path: Optional[str] = None) -> str:
        """A DeepSpeed/OpenMPI-style hostfile (``name slots=N`` per host)."""
        path = path or os.path.join(self.tmpdir, f"hostfile.{slots}")
        with open(path, "w") as f:
            f.write("".join(f"{h.name} slots={slots}\n" for h in self.hosts))
        return path

    # ---- running on a host ------------------------------------------------------------------------
    def wrap(self, host: Host, cmd: Sequence[str]) -> List[str]:
        """``cmd`` prefixed so that it runs in ``host``'s network and UTS namespaces."""
        return ["nsenter", f"--net={host.netns_path}", f"--uts={host.uts}", "--", *map(str, cmd)]

    def popen(self, host: Host, cmd: Sequence[str], env: Optional[Dict[str, str]] = None, **kw) -> subprocess.Popen:
        """Start ``cmd`` on ``host`` in a new session (text mode, stdout+stderr piped and merged unless given)."""
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.STDOUT)
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("text", True)
        kw.setdefault("start_new_session", True)
        return subprocess.Popen(self.wrap(host, cmd), env=env, **kw)

    def run(self, host: Host, cmd: Sequence[str], timeout: float = 60, env: Optional[Dict[str, str]] = None,
            **kw) -> subprocess.CompletedProcess:
        """Run ``cmd`` on ``host`` to completion; on timeout its process group is killed (returncode -9)."""
        kw.setdefault("stderr", subprocess.PIPE)
        p = self.popen(host, cmd, env=env, **kw)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
        return subprocess.CompletedProcess(p.args, p.returncode, out or "", err or "")

    def pids(self, host: Host) -> List[int]:
        """Every process running on ``host`` (by network namespace: sshd, ssh sessions, what they started)."""
        return pids_in_netns(host.netns_path)

    def kill_host(self, host: Host, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to every process of ``host`` (SIGKILL: the host dies); waits until all are gone."""
        _kill_netns(host.netns_path, sig)
        proc = self._sshd.get(host.index)
        if proc is not None and sig == signal.SIGKILL:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)

    def cut_link(self, host: Host) -> None:
        """Unplug ``host``'s cable (its bridge port goes down): packets to and from it are dropped
        silently, no reset reaches either side."""
        _sh("ip", "link", "set", host.veth, "down")

    def restore_link(self, host: Host) -> None:
        _sh("ip", "link", "set", host.veth, "up")


def _main(argv: Sequence[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cleanup", action="store_true",
                        help="tear down the instances whose owning process is gone")
    args = parser.parse_args(argv)
    if args.cleanup:
        print("removed:", " ".join(cleanup_stale()) or "nothing")
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(_main(sys.argv[1:]))
