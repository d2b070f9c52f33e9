"""A ``--save`` folder belongs to one run: lock, ownership, write access, free space, failed saves.

At start (:func:`prepare_save_dir`, collective, before the first iteration):

* **Lock** (:class:`SaveDirLock`). Rank 0 takes an exclusive ``flock`` on
  ``<save>/tokenformer_save.lock`` and keeps the descriptor open for the life of the process; the
  kernel releases it when the process ends, however it ends. The file holds the holder's host, pid,
  Slurm job id and start time, so a second job on the same folder ends with one line naming the
  folder and the holder. Where the file system refuses ``flock`` (ENOSYS, EOPNOTSUPP, ENOLCK) one
  line says so and an exclusive lock file (``O_CREAT | O_EXCL``) with the same record takes over.
* **Ownership.** A run that does not resume from ``--save`` itself (``--load`` elsewhere, a ``--load``
  that found nothing, ``--finetune``, or no ``--load``) is refused when the folder already holds step
  folders, naming them, unless ``--overwrite-checkpoints``. Every step folder records the id of the
  run that wrote it (``run_id`` in its metadata); a run that resumes from ``--save`` continues the
  id of the step it resumed from, any other run gets a new one. ``--keep-last-n-checkpoints`` deletes
  only steps carrying this run's id (:func:`prune_own_checkpoints`).
* **Write access.** Every rank creates the folder if needed and writes, fsyncs and removes a probe
  file in it: a missing, read-only (``EROFS``) or forbidden (``EACCES``) folder is reported before
  any training, not at the first save.
* **Free space** (:func:`free_space_warning`): compared with the size of the newest checkpoint (or an
  estimate from the parameter count); a warning line only.

A save that fails (:func:`agree_on_save`) is agreed by every rank, its ``.partial`` folder removed,
``latest`` left on the previous step, and the run ended with one line naming the folder and the OS
error (``ENOSPC``, ``EACCES``, ``EROFS``, ...).

An existing step folder is never written into: a save goes to ``global_step<N>.partial`` and is
renamed when complete; a step of the same name (a resumed run reaching a step that an interrupted
earlier attempt published, or ``--overwrite-checkpoints``) is replaced only by that rename.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import time
import uuid
from typing import List, NamedTuple, Optional

from megatron_tokenformer.checkpointing.format import files, metadata
from megatron_tokenformer.checkpointing.options import CheckpointOptions
from megatron_tokenformer.errors import EXIT_FAILED, TokenformerError

__all__ = ["LOCK_FILE", "EXCLUSIVE_LOCK_FILE", "FLOCK_UNSUPPORTED", "holder_is_dead", "SaveDirError", "SaveFailedError",
           "SaveDirLock", "check_ownership",
           "probe_writable", "os_error_text", "describe_save_error", "free_space_warning", "checkpoint_bytes",
           "prune_own_checkpoints", "resumes_from_save", "PreparedSaveDir", "prepare_save_dir", "agree_on_save",
           "holder_info"]

LOCK_FILE = "tokenformer_save.lock"
_PROBE_BYTES = 1 << 20


class SaveDirError(TokenformerError, RuntimeError):
    """The ``--save`` folder cannot be used by this run (the message is one line)."""

    every_rank_prints = False  # every rank agreed on it: rank 0 says it


class SaveFailedError(TokenformerError, RuntimeError):
    """A checkpoint save failed (the message names the folder, the rank and the OS error)."""

    exit_code = EXIT_FAILED  # every rank prints the same agreed line (a rank's log may be all one sees)


# --------------------------------------------------------------------------- errors as one line
def os_error_text(exc: BaseException) -> str:
    """``ENOSPC (No space left on device)`` for an OSError; its first line for anything else."""
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, f"errno {exc.errno}")
        return f"{name} ({exc.strerror or os.strerror(exc.errno)})"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _probe(folder: str, name: str, size: int = 1) -> None:
    """Write ``size`` bytes to ``folder/name``, fsync, remove (OSError on failure, nothing left)."""
    path = os.path.join(folder, name)
    try:
        with open(path, "wb") as f:
            f.write(b"\0" * size)
            f.flush()
            os.fsync(f.fileno())
    finally:
        try:
            os.remove(path)
        except OSError:
            pass


def describe_save_error(exc: BaseException, folder: str) -> str:
    """The OS cause of a failed write into ``folder``, as one line.

    torch's writer reports a full disk as ``basic_ios::clear: iostream error`` (no errno): for an
    error that is not an OSError the folder is probed with a 1 MiB write to find the OS error.
    """
    if isinstance(exc, OSError) and exc.errno is not None:
        where = getattr(exc, "filename", None) or folder
        return f"{os_error_text(exc)} writing {where}"
    probe_dir = folder if os.path.isdir(folder) else os.path.dirname(folder)
    try:
        _probe(probe_dir, f".tokenformer_probe_{os.getpid()}", _PROBE_BYTES)
    except OSError as probe_exc:
        return f"{os_error_text(probe_exc)} writing into {probe_dir} ({os_error_text(exc)})"
    return f"{os_error_text(exc)} while writing into {folder}"


# --------------------------------------------------------------------------- the lock
# flock refused by the file system (Lustre mounted without -o flock: ENOSYS; some NFS set-ups:
# ENOLCK / EOPNOTSUPP): the exclusive lock file takes over.
FLOCK_UNSUPPORTED = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOLCK, errno.EINVAL)
EXCLUSIVE_LOCK_FILE = LOCK_FILE + ".exclusive"


def _boot_id() -> Optional[str]:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _pid_start(pid: int) -> Optional[int]:
    """The start time of process ``pid`` (clock ticks since boot; None where /proc is missing)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def holder_info() -> dict:
    """Who this process is (written into the lock file): host, pid, Slurm job, start time, and what
    tells a dead holder on this host from a live one (boot id, the pid's start time)."""
    info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if os.environ.get("SLURM_JOB_ID"):
        info["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    boot, start = _boot_id(), _pid_start(os.getpid())
    if boot is not None:
        info["boot_id"] = boot
    if start is not None:
        info["pid_start"] = start
    return info


def holder_is_dead(info: dict) -> bool:
    """True only when the holder provably no longer runs: it ran on this host and this host rebooted
    since, or its pid is gone, or the pid now belongs to a process started at another time. A holder
    on another host is never judged dead (its pids cannot be seen from here)."""
    from megatron_tokenformer.fileio import pid_alive
    if not isinstance(info, dict) or info.get("host") != socket.gethostname():
        return False
    try:
        pid = int(info.get("pid"))
    except (TypeError, ValueError):
        return False
    if info.get("boot_id") and _boot_id() and info["boot_id"] != _boot_id():
        return True
    if not pid_alive(pid):
        return True
    start = _pid_start(pid)
    return info.get("pid_start") is not None and start is not None and start != info["pid_start"]


def _describe_holder(text: str) -> str:
    try:
        info = json.loads(text)
    except (ValueError, TypeError):
        return "holder unknown"
    if not isinstance(info, dict):
        return "holder unknown"
    parts = [f"host {info.get('host', '?')}", f"pid {info.get('pid', '?')}"]
    if info.get("slurm_job_id"):
        parts.append(f"Slurm job {info['slurm_job_id']}")
    if info.get("started"):
        parts.append(f"since {info['started']}")
    return ", ".join(parts)


def _flock(fd: int) -> None:
    """``fcntl.flock(fd, LOCK_EX | LOCK_NB)`` (one place, so tests can inject the file system's errno)."""
    import fcntl
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


class SaveDirLock:
    """The one-run-per-folder lock of ``<save_dir>`` (module docstring; docs/checkpoints.md).

    An exclusive ``flock`` on ``tokenformer_save.lock`` (released by the kernel however the process
    ends). Where the file system refuses ``flock`` (ENOSYS, EOPNOTSUPP, ENOLCK, ...) one line says so
    and the lock is the file ``tokenformer_save.lock.exclusive`` created with ``O_CREAT | O_EXCL``,
    holding the same holder record, removed on release and at exit. A lock file left by a holder
    that provably died on this host (:func:`holder_is_dead`) is taken over with one line; one of a
    holder on another host refuses the run, naming the file to delete once that job has ended.
    """

    def __init__(self, save_dir: str, log=None):
        self.save_dir = os.path.abspath(save_dir)
        self.path = os.path.join(self.save_dir, LOCK_FILE)
        self.exclusive_path = os.path.join(self.save_dir, EXCLUSIVE_LOCK_FILE)
        self._fd: Optional[int] = None
        self._exclusive_ino: Optional[int] = None
        self._log = log or (lambda line: print(line, flush=True))

    def _in_use(self, holder: str, extra: str = "") -> SaveDirError:
        return SaveDirError(f"--save {self.save_dir} is in use by another run ({holder}){extra}; wait for it to end "
                            f"or choose another --save")

    def acquire(self) -> "SaveDirLock":
        for _ in range(5):  # the lock file may be replaced between open and flock (expand_checkpoint moves it)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise SaveDirError(f"cannot lock --save {self.save_dir}: {os_error_text(exc)} creating "
                                   f"{self.path}") from None
            try:
                _flock(fd)
            except BlockingIOError:
                try:
                    holder = _describe_holder(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
                finally:
                    os.close(fd)
                raise self._in_use(holder) from None
            except OSError as exc:
                os.close(fd)
                if exc.errno not in FLOCK_UNSUPPORTED:
                    raise SaveDirError(f"cannot lock --save {self.save_dir}: {os_error_text(exc)} locking "
                                       f"{self.path}") from None
                # the file system refuses flock: an exclusive lock file instead
                self._log(f"note: the file system of --save {self.save_dir} refuses flock: {os_error_text(exc)}; "
                          f"locking it with the exclusive lock file {self.exclusive_path} instead")
                return self._acquire_exclusive()
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            self._check_no_exclusive_holder(fd)
            self._fd = fd
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(holder_info()) + "\n").encode(), 0)
                os.fsync(fd)
            except OSError as exc:
                self.release()
                raise SaveDirError(f"cannot lock --save {self.save_dir}: {os_error_text(exc)} writing the holder "
                                   f"record into {self.path}") from None
            return self
        raise SaveDirError(f"--save {self.save_dir}: its lock file {self.path} keeps being replaced; is another tool "
                           "writing this folder?")

    def _check_no_exclusive_holder(self, fd: int) -> None:
        """A run on a host whose mount refuses flock holds the exclusive file: respect it."""
        try:
            with open(self.exclusive_path) as f:
                text = f.read()
        except OSError:
            return
        try:
            info = json.loads(text)
        except ValueError:
            info = None
        if holder_is_dead(info):
            return
        os.close(fd)
        raise self._exclusive_in_use(text, info)

    def _exclusive_in_use(self, text: str, info) -> SaveDirError:
        extra = f"; lock file {self.exclusive_path}"
        if isinstance(info, dict) and info.get("host") != socket.gethostname():
            extra += " (held from another host: delete it once that run has ended)"
        return self._in_use(_describe_holder(text), extra)

    def _acquire_exclusive(self) -> "SaveDirLock":
        import atexit
        for _ in range(5):
            try:
                fd = os.open(self.exclusive_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._take_over_if_dead()
                continue
            except OSError as exc:
                raise SaveDirError(f"cannot lock --save {self.save_dir}: {os_error_text(exc)} creating "
                                   f"{self.exclusive_path}") from None
            try:
                self._exclusive_ino = os.fstat(fd).st_ino
                os.write(fd, (json.dumps(holder_info()) + "\n").encode())
                os.fsync(fd)
            except OSError as exc:
                os.close(fd)
                self.release()
                raise SaveDirError(f"cannot lock --save {self.save_dir}: {os_error_text(exc)} writing the holder "
                                   f"record into {self.exclusive_path}") from None
            os.close(fd)
            atexit.register(self.release)
            return self
        raise SaveDirError(f"--save {self.save_dir}: cannot create the lock file {self.exclusive_path} (it keeps "
                           "reappearing); is another run starting on this folder?")

    def _take_over_if_dead(self) -> None:
        """Remove the exclusive lock file of a dead holder (or raise SaveDirError naming a live or
        unknown one). The file is first renamed to a name of ours, so two runs taking over together
        cannot remove each other's new lock: what was renamed must be the file judged dead."""
        try:
            fd = os.open(self.exclusive_path, os.O_RDONLY)
        except FileNotFoundError:
            return  # released meanwhile: try again
        try:
            text = os.read(fd, 4096).decode("utf-8", "replace")
            ino = os.fstat(fd).st_ino
        finally:
            os.close(fd)
        try:
            info = json.loads(text)
        except ValueError:
            info = None
        holder = _describe_holder(text)
        if not holder_is_dead(info):
            raise self._exclusive_in_use(text, info)
        aside = f"{self.exclusive_path}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self.exclusive_path, aside)
        except FileNotFoundError:
            return
        if os.stat(aside).st_ino != ino:  # another run took over first and this moved its live lock: restore it
            try:
                os.link(aside, self.exclusive_path)
            except FileExistsError:
                pass
            os.remove(aside)
            return
        os.remove(aside)
        self._log(f"note: removed the lock file {self.exclusive_path} of a run that no longer runs ({holder})")

    @property
    def held(self) -> bool:
        return self._fd is not None or self._exclusive_ino is not None

    @property
    def files(self) -> List[str]:
        """The lock's files inside the folder (tools that replace the folder carry them over)."""
        return [p for p, held in ((self.path, self._fd is not None),
                                  (self.exclusive_path, self._exclusive_ino is not None)) if held]

    def remove_lock_file(self) -> None:
        """Unlink the flock file while still holding it (a tool that leaves no trace; a process that
        opened the old file sees it replaced after the release and opens the new one)."""
        if self._fd is not None:
            try:
                if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                    os.remove(self.path)
            except OSError:
                pass

    def release(self) -> None:
        if self._fd is not None:
            import fcntl
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None
        if self._exclusive_ino is not None:
            try:
                if os.stat(self.exclusive_path).st_ino == self._exclusive_ino:
                    os.remove(self.exclusive_path)
            except OSError:
                pass
            self._exclusive_ino = None


# --------------------------------------------------------------------------- ownership
def _same_folder(a: str, b: str) -> bool:
    return os.path.realpath(os.path.abspath(a)) == os.path.realpath(os.path.abspath(b))


def resumes_from_save(options: CheckpointOptions) -> Optional[str]:
    """The step folder of ``--save`` this run resumes from, or None (see the module docstring)."""
    load, save = options.load, options.save
    if not load or not save or options.finetune or not _same_folder(load, save):
        return None
    try:
        return files.resolve_step_dir(load)
    except (OSError, ValueError):
        return None  # the load reports it


def check_ownership(save_dir: str, resumed_step: Optional[str], overwrite: bool) -> List[str]:
    """Refuse a run that did not resume from ``save_dir`` when it holds step folders. Returns warnings."""
    steps = [name for _, name in files.list_step_dirs(save_dir, complete=False)]
    if resumed_step is None:
        if steps and not overwrite:
            shown = ", ".join(steps[:6]) + (f" and {len(steps) - 6} more" if len(steps) > 6 else "")
            latest = None
            try:
                latest = files.read_latest(save_dir)
            except (OSError, ValueError):
                pass
            raise SaveDirError(
                f"--save {save_dir} already holds checkpoints ({shown}"
                + (f"; `latest` names {latest}" if latest else "")
                + ") and this run does not resume from it; resume with --load " + save_dir
                + ", choose an empty --save, or pass --overwrite-checkpoints")
        return []
    resumed_n = files.step_number(os.path.basename(resumed_step))
    newer = [s for s in steps if resumed_n is not None and files.step_number(s) > resumed_n]
    if newer:
        return [f"warning: --save {save_dir} holds steps newer than {os.path.basename(resumed_step)}, which this "
                f"run resumes from ({', '.join(newer)}); each is replaced when the run saves that iteration"]
    return []


def _run_id_of(step_dir: Optional[str]) -> Optional[str]:
    if step_dir is None:
        return None
    try:
        return metadata.read_meta(step_dir).get("run_id")
    except (OSError, ValueError):
        return None


def prune_own_checkpoints(save_dir: str, keep_last_n: Optional[int], run_id: Optional[str]) -> List[str]:
    """Delete all but the newest ``keep_last_n`` complete steps that carry ``run_id``.

    Steps of other runs (another ``run_id``, or none recorded) and the step ``latest`` names are
    never deleted. Returns the deleted folder names.
    """
    if keep_last_n is None or keep_last_n < 1 or run_id is None:
        return []
    latest = files.read_latest(save_dir)
    own = [name for _, name in files.list_step_dirs(save_dir)
           if _run_id_of(os.path.join(save_dir, name)) == run_id]
    return files.remove_step_dirs(save_dir, [name for name in own[:-keep_last_n] if name != latest])


# --------------------------------------------------------------------------- write access, space
def probe_writable(save_dir: str, rank: int) -> None:
    """Create ``save_dir`` if needed and write, fsync and remove a probe file (SaveDirError if not)."""
    try:
        os.makedirs(save_dir, exist_ok=True)
    except OSError as exc:
        raise SaveDirError(f"--save {save_dir} cannot be created: {os_error_text(exc)}") from None
    if not os.path.isdir(save_dir):
        raise SaveDirError(f"--save {save_dir} is not a folder")
    try:
        _probe(save_dir, f".tokenformer_write_probe_rank{rank}_{os.getpid()}")
    except OSError as exc:
        raise SaveDirError(f"--save {save_dir} is not writable (rank {rank}): {os_error_text(exc)}") from None


def checkpoint_bytes(step_dir: str) -> int:
    total = 0
    for root, _, names in os.walk(step_dir):
        for name in names:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def _newest_step(folder: Optional[str]) -> Optional[str]:
    if not folder or not os.path.isdir(folder):
        return None
    steps = files.list_step_dirs(folder)
    return os.path.join(folder, steps[-1][1]) if steps else None


def free_space_warning(save_dir: str, load_dir: Optional[str], num_parameters: int,
                       bytes_per_parameter: int) -> Optional[str]:
    """A warning line when ``save_dir`` has less free space than one checkpoint needs, else None.

    The need is the size of the newest step in ``save_dir`` or ``load_dir``, or else the estimate
    ``num_parameters * bytes_per_parameter`` (weights + fp32 master weights + two Adam moments).
    """
    newest = _newest_step(save_dir) or _newest_step(load_dir)
    if newest is not None:
        need, how = checkpoint_bytes(newest), f"the size of {newest}"
    else:
        need, how = int(num_parameters) * int(bytes_per_parameter), \
            f"estimated from {num_parameters:,} parameters x {bytes_per_parameter} bytes"
    free = shutil.disk_usage(save_dir).free
    if free >= need:
        return None
    gib = 1024.0 ** 3
    return (f"warning: --save {save_dir} has {free / gib:.3g} GiB free but a checkpoint needs about "
            f"{need / gib:.3g} GiB ({how}); the first save will fail unless space is freed")


# --------------------------------------------------------------------------- collective steps
def _dist():
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None


def _gather(message: Optional[str]) -> List[Optional[str]]:
    dist = _dist()
    if dist is None:
        return [message]
    from megatron_tokenformer.tensor_parallel.mappings import all_gather_objects
    return all_gather_objects(message)


class PreparedSaveDir(NamedTuple):
    """What :func:`prepare_save_dir` returns: rank 0's lock (held until the process ends; None on the
    other ranks and without ``--save``) and the id recorded in every step this run writes (the same on
    every rank; None without ``--save``)."""
    lock: Optional[SaveDirLock]
    run_id: Optional[str]


def prepare_save_dir(options: CheckpointOptions) -> PreparedSaveDir:
    """The start-up checks of the module docstring (every rank calls this; raises SaveDirError on all)."""
    if not options.save:
        return PreparedSaveDir(None, None)
    dist = _dist()
    rank = dist.get_rank() if dist is not None else 0
    save_dir = os.path.abspath(options.save)
    lock, error, warnings = None, None, []
    resumed = resumes_from_save(options)
    run_id = (_run_id_of(resumed) if resumed else None) or uuid.uuid4().hex
    try:
        if rank == 0:
            probe_writable(save_dir, rank)
            lock = SaveDirLock(save_dir).acquire()
            warnings = check_ownership(save_dir, resumed, options.overwrite_checkpoints)
    except SaveDirError as exc:
        error = str(exc)
    if error is None and rank != 0:
        try:
            probe_writable(save_dir, rank)
        except SaveDirError as exc:
            error = str(exc)
    errors = [e for e in _gather(error) if e]
    if errors:
        if lock is not None:
            lock.release()
        raise SaveDirError(errors[0])
    if dist is not None:  # one id for the whole run (rank 0's), though only rank 0 writes metadata
        from megatron_tokenformer.tensor_parallel.mappings import broadcast_object
        run_id = broadcast_object(run_id, src=0)
    for line in warnings:
        print(line, flush=True)
    return PreparedSaveDir(lock, run_id)


def agree_on_save(error: Optional[BaseException], partial_dir: str, iteration: int) -> None:
    """Every rank calls this after writing its part of a step (``error``: what its writes raised).

    When any rank failed: rank 0 removes ``partial_dir`` and every rank raises SaveFailedError with
    the first failing rank's one-line description; ``latest`` still names the previous step.
    """
    dist = _dist()
    rank = dist.get_rank() if dist is not None else 0
    message = None if error is None else describe_save_error(error, partial_dir)
    failed = [(r, m) for r, m in enumerate(_gather(message)) if m]
    if not failed:
        return
    if rank == 0:
        shutil.rmtree(partial_dir, ignore_errors=True)
    r, m = failed[0]
    save_dir = os.path.dirname(os.path.abspath(partial_dir))
    raise SaveFailedError(f"saving iteration {iteration} into --save {save_dir} failed on rank {r}: {m}; "
                          f"the partial step was removed and `latest` still names the previous step")
