"""checkpointing/save_dir.py, the lock part: the exclusive lock file where the file system refuses
``flock`` (each errno injected into the flock call), the second job refused naming the holder, stale
lock files of dead holders, holders on another host. (The flock path itself: test_save_dir.py.)"""

import errno
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from megatron_tokenformer.checkpointing import save_dir
from tests.helpers import train_runs

# A process that holds the lock of argv[1] with flock refused by ENOSYS (as on Lustre without -o flock)
HOLD_NO_FLOCK = (
    "import errno, sys, time\n"
    "from megatron_tokenformer.checkpointing import save_dir\n"
    "def refuse(fd): raise OSError(errno.ENOSYS, 'Function not implemented')\n"
    "save_dir._flock = refuse\n"
    "save_dir.SaveDirLock(sys.argv[1]).acquire()\n"
    "print('held', flush=True)\n"
    "time.sleep(600)\n")


def _refuse_flock(monkeypatch, code):
    def refuse(fd):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(save_dir, "_flock", refuse)


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK])
def test_flock_refused_falls_back_to_an_exclusive_lock_file(tmp_path, monkeypatch, code):
    _refuse_flock(monkeypatch, code)
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    lines = []
    lock = save_dir.SaveDirLock(str(tmp_path), log=lines.append).acquire()
    path = os.path.join(str(tmp_path), save_dir.EXCLUSIVE_LOCK_FILE)
    try:
        assert lock.held and len(lines) == 1 and "\n" not in lines[0]
        assert lines[0].startswith(f"note: the file system of --save {tmp_path} refuses flock: "
                                   f"{errno.errorcode[code]} (")
        assert path in lines[0]
        record = json.load(open(path))
        assert record["host"] == socket.gethostname() and record["pid"] == os.getpid()
        assert record["slurm_job_id"] == "777"
        with pytest.raises(save_dir.SaveDirError) as info:        # a second lock on the folder is refused
            save_dir.SaveDirLock(str(tmp_path), log=lines.append).acquire()
        msg = str(info.value)
        assert "\n" not in msg and msg.startswith(f"--save {tmp_path} is in use by another run (host "
                                                  f"{socket.gethostname()}, pid {os.getpid()}, Slurm job 777")
    finally:
        lock.release()
    assert not os.path.exists(path)                                # released: the file is gone
    save_dir.SaveDirLock(str(tmp_path), log=lines.append).acquire().release()


def test_other_flock_errors_end_in_one_line_never_unlocked(tmp_path, monkeypatch):
    _refuse_flock(monkeypatch, errno.EIO)
    with pytest.raises(save_dir.SaveDirError) as info:
        save_dir.SaveDirLock(str(tmp_path)).acquire()
    assert str(info.value) == (f"cannot lock --save {tmp_path}: EIO (Input/output error) locking "
                               f"{tmp_path}/{save_dir.LOCK_FILE}")


def _hold_without_flock(folder, extra_env=None):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_NO_FLOCK, folder], env=train_runs.env(extra_env),
                              stdout=subprocess.PIPE, text=True)
    first = holder.stdout.readline()
    assert "refuses flock: ENOSYS" in first and holder.stdout.readline().strip() == "held"
    return holder


def test_second_job_refused_then_dead_holder_taken_over(tmp_path, monkeypatch):
    """A second process (flock refused too) is refused naming the holder; after the holder is SIGKILLed
    (the lock file stays: no kernel release without flock), the next one takes over with a line. A
    process whose flock works (another host mounting the folder differently) respects the file too."""
    folder = str(tmp_path)
    holder = _hold_without_flock(folder, {"SLURM_JOB_ID": "4242"})
    try:
        with pytest.raises(save_dir.SaveDirError) as info:
            save_dir.SaveDirLock(folder).acquire()              # flock works in this process
        assert f"pid {holder.pid}, Slurm job 4242" in str(info.value)
        _refuse_flock(monkeypatch, errno.ENOSYS)
        with pytest.raises(save_dir.SaveDirError) as info:
            save_dir.SaveDirLock(folder, log=lambda line: None).acquire()
        msg = str(info.value)
        assert f"host {socket.gethostname()}, pid {holder.pid}, Slurm job 4242" in msg
        assert f"lock file {folder}/{save_dir.EXCLUSIVE_LOCK_FILE}" in msg and "another host" not in msg
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert os.path.exists(os.path.join(folder, save_dir.EXCLUSIVE_LOCK_FILE))
    lines = []
    lock = save_dir.SaveDirLock(folder, log=lines.append).acquire()
    try:
        assert len(lines) == 2 and lines[1].startswith(f"note: removed the lock file {folder}/"
                                                       f"{save_dir.EXCLUSIVE_LOCK_FILE} of a run that no longer runs "
                                                       f"(host {socket.gethostname()}, pid {holder.pid}")
        assert json.load(open(os.path.join(folder, save_dir.EXCLUSIVE_LOCK_FILE)))["pid"] == os.getpid()
        assert sorted(os.listdir(folder)) == [save_dir.LOCK_FILE, save_dir.EXCLUSIVE_LOCK_FILE]   # no .stale-*
    finally:
        lock.release()


def _write_record(folder, **record):
    with open(os.path.join(folder, save_dir.EXCLUSIVE_LOCK_FILE), "w") as f:
        json.dump(record, f)


def test_holder_on_another_host_is_never_taken_over(tmp_path, monkeypatch):
    _refuse_flock(monkeypatch, errno.ENOLCK)
    folder = str(tmp_path)
    _write_record(folder, host="node-b-" + socket.gethostname(), pid=1, slurm_job_id="9")
    with pytest.raises(save_dir.SaveDirError) as info:
        save_dir.SaveDirLock(folder, log=lambda line: None).acquire()
    assert "(held from another host: delete it once that run has ended)" in str(info.value)
    assert f"host node-b-{socket.gethostname()}, pid 1, Slurm job 9" in str(info.value)
    assert os.path.exists(os.path.join(folder, save_dir.EXCLUSIVE_LOCK_FILE))


def test_reused_pid_and_reboot_count_as_dead(tmp_path):
    me = save_dir.holder_info()
    assert not save_dir.holder_is_dead(me)                                       # this very process
    assert save_dir.holder_is_dead(dict(me, pid_start=me["pid_start"] + 1))     # same pid, another process
    assert save_dir.holder_is_dead(dict(me, boot_id="0-rebooted-since"))
    assert not save_dir.holder_is_dead(dict(me, host="elsewhere"))              # unknowable: never dead
    assert not save_dir.holder_is_dead({"host": me["host"]})                     # no pid: not provably dead
