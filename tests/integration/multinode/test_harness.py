"""The multi-host harness itself (tests/helpers/multihost.py): hosts have their own names, reach each
other by name over ssh and pdsh with the run's key, a cut link drops traffic silently and comes back,
a killed host has no process left, and nothing is left behind afterwards — after a normal exit, an
exception, a Ctrl-C, or the owner being SIGKILLed (the next instance cleans up)."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.helpers import multihost
from tests.helpers.paths import REPO_ROOT

pytestmark = pytest.mark.skipif(multihost.unavailable_reason() is not None,
                                reason=str(multihost.unavailable_reason()))


def _leftovers(mh_tag, tmpdir, names):
    """What of instance ``mh_tag`` is still on the machine (an empty list when it is all gone)."""
    left = []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    with open("/etc/hosts") as f:
        hosts = f.read()
    left += [f"netns {line.split()[0]}" for line in netns.splitlines() if mh_tag in line]
    left += [f"link {line.split(':')[1].strip()}" for line in links.splitlines() if mh_tag in line]
    left += [f"/etc/hosts {n}" for n in names if n in hosts]
    left += ["/etc/hosts marker"] if mh_tag in hosts else []
    left += [f"state {e}" for e in os.listdir(multihost.STATE_DIR) if mh_tag in e]
    left += [f"tmpdir {tmpdir}"] if tmpdir and os.path.exists(tmpdir) else []
    left += [f"process {pid}" for pid in _pids_with(mh_tag)]
    return left


def _pids_with(text):
    pids = []
    for e in os.listdir("/proc"):
        if e.isdigit() and int(e) != os.getpid():
            try:
                with open(f"/proc/{e}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        pids.append(int(e))
            except OSError:
                pass
    return pids


def test_hosts_names_ssh_pdsh_link_kill_and_teardown():
    with multihost.MultiHost(2) as mh:
        h0, h1 = mh.hosts
        tag, tmpdir, names = mh.tag, mh.tmpdir, [h.name for h in mh.hosts]
        # own hostnames, different from each other and from the machine's
        got = [mh.run(h, ["hostname"]).stdout.strip() for h in mh.hosts]
        assert got == names and len(set(got + [os.uname().nodename])) == 3
        # the subnet exists only on the bridge: no address of it here, no default route on a host
        root_addrs = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True).stdout
        assert mh.subnet + "." not in root_addrs
        assert "default" not in mh.run(h0, ["ip", "route"]).stdout
        assert mh.run(h0, ["ip", "-o", "-4", "addr"]).stdout.count("inet ") == 2  # lo + its veth
        # by name over ssh (the run's key, no known_hosts), both ways, and pdsh across both hosts
        for a, b in ((h0, h1), (h1, h0)):
            r = mh.run(a, mh.ssh_cmd(b, "hostname; cat /proc/sys/kernel/hostname"), timeout=30)
            assert r.returncode == 0 and r.stdout.split() == [b.name, b.name], r
        r = mh.run(h0, ["pdsh", "-w", ",".join(names), "hostname"], env=mh.env(), timeout=30)
        assert r.returncode == 0, r
        assert sorted(r.stdout.splitlines()) == sorted(f"{n}: {n}" for n in names)
        # a plain `ssh` (what DeepSpeed's runner calls) finds the run's key through the wrapper on PATH
        r = mh.run(h1, ["ssh", h0.name, "hostname"], env=mh.env(), timeout=30)
        assert r.returncode == 0 and r.stdout.strip() == h0.name, r
        # a cut link drops packets silently (a timeout, not a refusal); restored, it works again
        mh.cut_link(h1)
        r = mh.run(h0, mh.ssh_cmd(h1, "true") + ["-o", "ConnectTimeout=2"], timeout=30)
        assert r.returncode == 255 and "timed out" in r.stderr, r
        mh.restore_link(h1)
        assert mh.run(h0, mh.ssh_cmd(h1, "hostname"), timeout=30).stdout.strip() == h1.name
        # kill_host: every process of the host is gone (its sshd and a sleeper started on it)
        sleeper = mh.popen(h1, ["sleep", "600"])
        deadline = time.time() + 30  # nsenter enters the namespace after Popen returns (a loaded machine: later)
        while sleeper.pid not in mh.pids(h1) and time.time() < deadline:
            time.sleep(0.1)
        assert sleeper.pid in mh.pids(h1) and len(mh.pids(h1)) >= 2
        assert sleeper.pid not in mh.pids(h0)
        mh.kill_host(h1)
        assert mh.pids(h1) == [] and sleeper.wait(timeout=10) == -signal.SIGKILL
        assert mh.run(h0, mh.ssh_cmd(h1, "true"), timeout=30).returncode == 255
        mh.start_sshd(h1)
        assert mh.run(h0, mh.ssh_cmd(h1, "hostname"), timeout=30).stdout.strip() == h1.name
        assert mh.pids(h1)
    assert _leftovers(tag, tmpdir, names) == []


def test_teardown_after_an_exception():
    seen = {}
    with pytest.raises(ZeroDivisionError):
        with multihost.MultiHost(1) as mh:
            seen.update(tag=mh.tag, tmpdir=mh.tmpdir, names=[h.name for h in mh.hosts])
            mh.popen(mh.hosts[0], ["sleep", "600"])
            1 / 0
    assert _leftovers(seen["tag"], seen["tmpdir"], seen["names"]) == []


_CHILD = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as in a terminal (a background job ignores it)
from tests.helpers.multihost import MultiHost
mh = MultiHost(1).__enter__()
mh.popen(mh.hosts[0], ["sleep", "600"])
print(mh.tag, mh.tmpdir, mh.hosts[0].name, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl_c", "owner_sigkilled"])
def test_teardown_when_the_owner_is_interrupted_or_killed(sig):
    """Ctrl-C: the owner tears down itself (atexit). SIGKILL: the next instance tears it down."""
    p = subprocess.Popen([sys.executable, "-c", _CHILD], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
                         stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": REPO_ROOT})  # Ctrl-C's traceback
    timer = threading.Timer(300, p.kill)  # a hang guard: building a host takes a minute on a loaded machine
    timer.start()
    try:
        tag, tmpdir, name = p.stdout.readline().split()
    finally:
        timer.cancel()
    assert _leftovers(tag, tmpdir, [name]) != []  # it is there while the owner lives
    p.send_signal(sig)
    p.wait(timeout=300)
    if sig == signal.SIGKILL:
        assert multihost.pids_in_netns(f"/run/netns/{tag}-n0")  # the owner could not clean up
        assert tag in multihost.cleanup_stale()
    assert _leftovers(tag, tmpdir, [name]) == []


def test_hosts_file_edits_of_concurrent_instances_keep_each_other(tmp_path, monkeypatch):
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    monkeypatch.setattr(multihost, "HOSTS_FILE", str(hosts))
    tags = [f"t{i}" for i in range(8)]

    def add_remove(tag):
        for k in range(20):
            multihost._edit_hosts(tag, [f"10.0.0.{k} {tag}-n0", f"10.0.0.{k} {tag}-n1"])
        multihost._edit_hosts(tag, [f"10.0.0.1 {tag}-keep"])

    threads = [threading.Thread(target=add_remove, args=(t,)) for t in tags]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = hosts.read_text().splitlines()
    assert lines[0] == "127.0.0.1 localhost"
    assert sorted(l for l in lines if "-keep" in l) == sorted(f"10.0.0.1 {t}-keep" for t in tags)
    assert not [l for l in lines if "-n0" in l or "-n1" in l]
    for t in tags:
        multihost._edit_hosts(t, [])
    assert hosts.read_text() == "127.0.0.1 localhost\n"
