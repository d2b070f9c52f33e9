"""checkpointing/save_dir.py: the --save lock, ownership, pruning, write probe, free space, failed saves."""

import dataclasses
import errno
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from megatron_tokenformer.checkpointing import save_dir
from megatron_tokenformer.checkpointing.format import files, metadata
from megatron_tokenformer.checkpointing.options import CheckpointOptions
from tests.helpers import train_runs

HOLD = ("import sys, time; from megatron_tokenformer.checkpointing.save_dir import SaveDirLock; "
        "SaveDirLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)")


def _step(folder, n, run_id=None):
    d = os.path.join(folder, f"global_step{n}")
    os.makedirs(d)
    meta = {"format_version": metadata.FORMAT_VERSION, "iteration": n}
    if run_id is not None:
        meta["run_id"] = run_id
    with open(os.path.join(d, files.META_FILE), "w") as f:
        json.dump(meta, f)
    with open(os.path.join(d, "weights.pt"), "wb") as f:
        f.write(os.urandom(100))
    return d


def test_lock_held_by_another_process_names_the_holder_and_is_released_on_death(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], env=train_runs.env({"SLURM_JOB_ID": "4242"}),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(save_dir.SaveDirError) as info:
            save_dir.SaveDirLock(str(tmp_path)).acquire()
        msg = str(info.value)
        assert "\n" not in msg and msg.startswith(f"--save {tmp_path} is in use by another run")
        assert f"host {socket.gethostname()}" in msg and f"pid {holder.pid}" in msg and "Slurm job 4242" in msg
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = save_dir.SaveDirLock(str(tmp_path)).acquire()   # the kernel released the dead holder's lock
    try:
        info = json.loads(open(os.path.join(str(tmp_path), save_dir.LOCK_FILE)).read())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    finally:
        lock.release()


def test_ownership_refuses_a_run_that_did_not_resume(tmp_path):
    folder = str(tmp_path)
    assert save_dir.check_ownership(folder, None, overwrite=False) == []   # empty folder: fine
    _step(folder, 2)
    _step(folder, 10)
    os.makedirs(os.path.join(folder, "global_step12.partial"))             # not a step folder
    files.update_latest(folder, "global_step10")
    with pytest.raises(save_dir.SaveDirError) as info:
        save_dir.check_ownership(folder, None, overwrite=False)
    msg = str(info.value)
    assert "(global_step2, global_step10; `latest` names global_step10)" in msg and "--overwrite-checkpoints" in msg
    assert save_dir.check_ownership(folder, None, overwrite=True) == []
    warnings = save_dir.check_ownership(folder, os.path.join(folder, "global_step2"), overwrite=False)
    assert len(warnings) == 1 and "(global_step10)" in warnings[0]


def test_resumes_from_save_only_for_the_same_folder(tmp_path):
    folder = str(tmp_path / "run")
    os.makedirs(folder)
    step = _step(folder, 4)
    files.update_latest(folder, "global_step4")

    a = CheckpointOptions(save=folder, load=folder + "/", finetune=False)
    assert save_dir.resumes_from_save(a) == step
    os.symlink(folder, str(tmp_path / "link"))
    a = dataclasses.replace(a, load=str(tmp_path / "link"))
    assert save_dir.resumes_from_save(a) is not None
    a = dataclasses.replace(a, finetune=True)
    assert save_dir.resumes_from_save(a) is None
    a = dataclasses.replace(a, finetune=False, load=str(tmp_path / "typo"))
    assert save_dir.resumes_from_save(a) is None


def test_prune_deletes_only_this_runs_steps_and_never_latest(tmp_path):
    folder = str(tmp_path)
    for n in (1, 3):
        _step(folder, n, run_id="other")
    _step(folder, 5)                          # written before run ids existed
    for n in (2, 4, 6, 8):
        _step(folder, n, run_id="mine")
    files.update_latest(folder, "global_step6")
    deleted = save_dir.prune_own_checkpoints(folder, 1, "mine")
    assert deleted == ["global_step2", "global_step4"]     # 6 is `latest`, 8 the newest of this run
    assert sorted(os.listdir(folder)) == ["global_step1", "global_step3", "global_step5", "global_step6",
                                          "global_step8", "latest"]
    assert save_dir.prune_own_checkpoints(folder, 1, None) == []


def test_probe_writable(tmp_path):
    target = str(tmp_path / "a" / "b")
    save_dir.probe_writable(target, 0)
    assert os.listdir(target) == []                       # created, probe removed
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(save_dir.SaveDirError) as info:
        save_dir.probe_writable(str(blocker / "ckpt"), 3)
    assert str(info.value).startswith(f"--save {blocker / 'ckpt'} cannot be created: ") and "ENOTDIR" in str(info.value)


def test_describe_save_error():
    assert save_dir.describe_save_error(OSError(errno.ENOSPC, "No space left on device", "/x/y.pt"), "/x") == \
        "ENOSPC (No space left on device) writing /x/y.pt"
    assert save_dir.describe_save_error(OSError(errno.EROFS, "Read-only file system"), "/x") == \
        "EROFS (Read-only file system) writing /x"
    # torch's writer gives no errno: the folder is probed (here it does not exist)
    msg = save_dir.describe_save_error(RuntimeError("basic_ios::clear: iostream error"), "/nonexistent/dir/x.partial")
    assert msg.startswith("ENOENT (No such file or directory) writing into /nonexistent/dir")
    assert "basic_ios::clear" in msg


def test_agree_on_save_single_process(tmp_path):
    partial = tmp_path / "global_step4.partial"
    partial.mkdir()
    (partial / "half.pt").write_bytes(b"x")
    save_dir.agree_on_save(None, str(partial), 4)
    assert partial.exists()
    with pytest.raises(save_dir.SaveFailedError) as info:
        save_dir.agree_on_save(OSError(errno.ENOSPC, "No space left on device"), str(partial), 4)
    assert not partial.exists()
    assert str(info.value).startswith(f"saving iteration 4 into --save {tmp_path} failed on rank 0: ENOSPC")


def test_free_space_warning(tmp_path):
    folder = str(tmp_path)
    assert save_dir.free_space_warning(folder, None, 1000, 16) is None
    msg = save_dir.free_space_warning(folder, None, 10 ** 18, 16)
    assert msg.startswith(f"warning: --save {folder} has ") and "estimated from 1,000,000,000,000,000,000" in msg
    step = _step(folder, 2)
    assert save_dir.checkpoint_bytes(step) == 100 + os.path.getsize(os.path.join(step, files.META_FILE))
    assert save_dir.free_space_warning(folder, None, 10 ** 18, 16) is None   # the last step's size wins


def test_prepare_save_dir_returns_the_run_id_and_leaves_the_arguments_alone(tmp_path):
    """The run id is returned, never set on the argument namespace: a fresh run gets a new one, a run
    resuming from --save continues the id recorded in the step it resumes from."""
    import argparse

    from megatron_tokenformer.arguments import checkpoint_options
    folder = str(tmp_path / "save")
    flags = dict(load=None, finetune=False, no_load_optim=False, no_load_rng=False, keep_last_n_checkpoints=None,
                 overwrite_checkpoints=False)
    fresh = argparse.Namespace(save=folder, **flags)
    before = dict(vars(fresh))
    lock, run_id = save_dir.prepare_save_dir(checkpoint_options(fresh))
    try:
        assert vars(fresh) == before and lock.held
        assert isinstance(run_id, str) and len(run_id) == 32 and int(run_id, 16) >= 0
    finally:
        lock.release()
    _step(folder, 4, run_id="0123abcd" * 4)
    files.update_latest(folder, "global_step4")
    resumed = argparse.Namespace(save=folder, **dict(flags, load=folder))
    before = dict(vars(resumed))
    lock, run_id = save_dir.prepare_save_dir(checkpoint_options(resumed))
    lock.release()
    assert run_id == "0123abcd" * 4 and vars(resumed) == before
    again = save_dir.prepare_save_dir(CheckpointOptions(save=folder, load=folder, finetune=True,
                                                        overwrite_checkpoints=True))
    again.lock.release()
    assert again.run_id not in (None, "0123abcd" * 4)             # --finetune: a new run, a new id
    assert save_dir.prepare_save_dir(CheckpointOptions(save=None)) == (None, None)
