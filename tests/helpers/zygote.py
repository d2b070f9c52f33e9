"""A per-worker fork server for the suite's training runs: torch, DeepSpeed and ``torch._dynamo`` imported
once per pytest worker instead of once per rank.

A rank of a tiny test run of pretrain_tokenformer.py spends most of its ~5 CPU-seconds importing (torch,
DeepSpeed, and ``torch._dynamo``, which torch's optimizers import when they are built); on this 2-core
machine the suite's CPU time is what bounds its wall time. The server (``python -m tests.helpers.zygote
serve SOCKET``, started by :func:`server_socket` on first use, ended with the worker) imports them and
forks a *job manager* per request; the manager forks the job's ranks.

The test still starts a process of its own -- a tiny client (``zygote_client.py``, the interpreter without
site-packages: ~20 ms) -- so that ``Popen`` works as before:

* the client passes its argv, environment, working directory and its stdin/stdout/stderr (SCM_RIGHTS) to
  the manager; the ranks write straight into the test's pipes;
* SIGINT, SIGTERM, SIGUSR1, SIGUSR2 and SIGHUP sent to the client are forwarded to every rank;
* the client exits with the job's status: one rank -- its exit code, or the same signal that ended it;
  several ranks -- 1 if any failed (the others are sent SIGTERM at the first failure, SIGKILL after
  ``GRACE_S``), else 0, as torchrun on one host;
* when the client dies (a test's timeout kills its process group), the manager SIGKILLs the job's
  process group (ranks and their data-loader workers).

Ranks get the variables torchrun sets on one host (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
GROUP_RANK, MASTER_ADDR, MASTER_PORT) when there are several, none for one (``python SCRIPT``), and run
the script as ``__main__``.

Used only where neither the launcher nor the process itself is the subject (layout equivalence,
checkpoints: tests/helpers/ckpt_runs.py, layout_runs.py). A run is forked by a server started with the
same values of everything read while starting and importing (:data:`IMPORT_TIME_ENV`: one server per
distinct set). Forking is safe: the server starts no thread (checked before it serves)."""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional, Sequence

GRACE_S = 30.0
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)
CLIENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "zygote_client.py")
# what every rank of pretrain_tokenformer.py imports (the costly part first)
PRELOAD = ("torch", "torch._dynamo", "deepspeed", "deepspeed.ops", "deepspeed.comm",
           "megatron_tokenformer.arguments", "megatron_tokenformer.parallel_state",
           "megatron_tokenformer.training.engine", "megatron_tokenformer.training.loop",
           "megatron_tokenformer.checkpointing.io")
# what interpreter start-up or those imports read from the environment: a run whose values differ gets a
# server of its own (DeepSpeed picks its accelerator while importing; the rest is read at run time)
IMPORT_TIME_ENV = ("PYTHON", "LD_", "DS_ACCELERATOR", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
# ... of which a forked rank sets these itself: the module search path (a run whose path would find another
# copy of a preloaded package is refused: the plain command runs) and the intra-op thread count (the server
# imports single-threaded: torch starts its thread pool at import otherwise)
SET_IN_THE_RANK = ("PYTHONPATH", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
NOT_READ_BY_PYTHON = ("PYTHON",)  # the scripts' own name for their interpreter
# the top-level packages whose preloaded copy a run must find on its own module search path
PRELOADED_PACKAGES = ("torch", "deepspeed", "megatron_tokenformer", "tests")
SHIM_BIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "zygote_bin")


# --------------------------------------------------------------------------- test side


_SERVERS: Dict[tuple, Dict[str, object]] = {}  # signature -> {"pid", "path", "proc"}


def signature(env: Dict[str, str]) -> tuple:
    """What a run's environment must share with a server's for the run to be forked by it."""
    return tuple(sorted((k, v) for k, v in env.items()
                        if k.startswith(IMPORT_TIME_ENV) and k not in SET_IN_THE_RANK + NOT_READ_BY_PYTHON))


def compatible(env: Dict[str, str], server_env: Dict[str, str]) -> bool:
    """Whether a run with ``env`` may be forked from a server started with ``server_env``."""
    return signature(env) == signature(server_env)


def server_socket(env: Dict[str, str]) -> str:
    """The socket of this process's server for runs with ``env`` (started on first use)."""
    key = signature(env)
    server = _SERVERS.get(key)
    if server is not None and server["pid"] == os.getpid() and server["path"] is None:
        raise RuntimeError("the zygote server for this environment could not start")
    if server is None or server["pid"] != os.getpid():  # not one inherited through a fork
        folder = tempfile.mkdtemp(prefix="zygote-")
        path = os.path.join(folder, "socket")
        log = open(os.path.join(folder, "server.log"), "w")
        server_env = dict(env, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        proc = subprocess.Popen([sys.executable, "-m", "tests.helpers.zygote", "serve", path], env=server_env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.time() + 300  # the imports, on a loaded machine
        while not os.path.exists(path):
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the zygote server did not start: {open(log.name).read()[-3000:]}")
            time.sleep(0.02)
        server = _SERVERS[key] = {"pid": os.getpid(), "path": path, "proc": proc}
        atexit.register(_stop_server, proc)
    return server["path"]  # type: ignore[return-value]


def _stop_server(proc) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


def launch_command(nproc: int, script: str, args: Sequence[str], env: Dict[str, str],
                   plain: List[str]) -> List[str]:
    """The client command that runs ``script args`` on ``nproc`` ranks forked by the server for ``env``
    (``plain`` where MEGATRON_TOKENFORMER_TEST_NO_ZYGOTE=1)."""
    if "1" in (env.get("MEGATRON_TOKENFORMER_TEST_NO_ZYGOTE"), os.environ.get("MEGATRON_TOKENFORMER_TEST_NO_ZYGOTE")):
        return plain
    try:
        path = server_socket(env)
    except RuntimeError:  # e.g. OMP_NUM_THREADS > 1: importing torch starts a thread pool, no forking then
        _SERVERS[signature(env)] = {"pid": os.getpid(), "path": None, "proc": None}
        return plain
    return plain if path is None else [sys.executable, "-S", "-I", CLIENT, path, str(nproc), script] + list(args)


def shim_env(env: Dict[str, str]) -> Dict[str, str]:
    """``env`` for a script (a shell script, a docs page) whose ``python``/``python3``/``torchrun`` commands
    -- or ``$PYTHON`` -- should run Python scripts forked by this worker's server: ``python SCRIPT.py ...``
    and ``torchrun [--standalone] --nproc_per_node N ... SCRIPT.py ...`` (or ``python -m
    torch.distributed.run ...``) are forked; every other command (``python -c``, ``-m other``, options it
    does not know) and a run the server refuses run the real program. ``env`` unchanged where no server
    can run or MEGATRON_TOKENFORMER_TEST_NO_ZYGOTE=1."""
    if "1" in (env.get("MEGATRON_TOKENFORMER_TEST_NO_ZYGOTE"), os.environ.get("MEGATRON_TOKENFORMER_TEST_NO_ZYGOTE")):
        return dict(env)
    try:
        path = server_socket(env)
    except RuntimeError:
        _SERVERS[signature(env)] = {"pid": os.getpid(), "path": None, "proc": None}
        return dict(env)
    real_bin = os.path.dirname(sys.executable)
    return dict(env, PATH=SHIM_BIN + os.pathsep + env.get("PATH", os.defpath), PYTHON=os.path.join(SHIM_BIN, "python"),
                ZYGOTE_SOCKET=path, ZYGOTE_REAL_PYTHON=sys.executable,
                ZYGOTE_REAL_TORCHRUN=os.path.join(real_bin, "torchrun"))


# --------------------------------------------------------------------------- server side


def _preload() -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    if threading.active_count() != 1 or len(os.listdir("/proc/self/task")) != 1:
        raise SystemExit(f"zygote: importing {', '.join(PRELOAD)} started a thread: forking would copy it half-way")


def serve(path: str) -> None:
    _SERVER_PYTHONPATH[:] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    parent = os.getppid()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".tmp")
    listener.listen(64)
    _preload()
    os.rename(path + ".tmp", path)  # clients connect once the imports are done
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # managers are reaped by the kernel
    listener.settimeout(1.0)
    while os.getppid() == parent:
        try:
            conn, _ = listener.accept()
        except socket.timeout:
            continue
        pid = os.fork()
        if pid == 0:
            listener.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            conn.settimeout(None)
            _manage(conn)  # never returns in a rank; exits the manager
        conn.close()


def _receive(conn: socket.socket):
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    (size,) = struct.unpack("!Q", data[:8])
    body = data[8:]
    while len(body) < size:
        more = conn.recv(size - len(body))
        if not more:
            raise EOFError("the client went away")
        body += more
    return json.loads(body), fds


def _manage(conn: socket.socket) -> None:
    try:
        request, fds = _receive(conn)
    except Exception:
        os._exit(1)
    why = _refusal(request)
    if why:  # the client runs the plain command
        print(f"zygote: not forked ({why})", file=sys.stderr, flush=True) if os.environ.get("ZYGOTE_DEBUG") else None
        try:
            conn.sendall(b"R\n")
        finally:
            os._exit(0)
    os.setpgid(0, 0)  # the job's own process group: its ranks and their data-loader workers
    for i, fd in enumerate(fds):
        os.dup2(fd, i)
        os.close(fd)
    os.chdir(request["cwd"])
    nproc = int(request["nproc"])
    port = 0
    if nproc > 1:
        from megatron_tokenformer.launch import find_free_port
        port = find_free_port()
    children: Dict[int, int] = {}
    for rank in range(nproc):
        pid = os.fork()
        if pid == 0:
            conn.close()
            _run_rank(rank, nproc, port, request)
        children[pid] = rank
    code = _supervise(conn, children, nproc)
    try:
        conn.sendall(b"X%d\n" % code)
    except OSError:
        pass
    os._exit(0)


_SERVER_PYTHONPATH: List[str] = []  # the server's own PYTHONPATH entries (set by serve)


def _module_path(env: Dict[str, str], script: str) -> List[str]:
    """sys.path of ``python SCRIPT`` under ``env``, built from this server's: the script's folder, the
    run's PYTHONPATH entries, then the server's path without its own PYTHONPATH entries."""
    extra = [os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    own = {os.path.abspath(p) for p in _SERVER_PYTHONPATH}
    base = [p for p in sys.path[1:] if os.path.abspath(p) not in own]
    return [os.path.dirname(os.path.abspath(script))] + extra + base


def _refusal(request) -> Optional[str]:
    """Why a run cannot be forked by this server (None: it can): an import-time setting differs, or the
    run's module search path would find another copy of a preloaded package."""
    env = request["env"]
    if signature(env) != signature(dict(os.environ)):
        return "an import-time environment variable differs"
    from importlib.machinery import PathFinder

    path = _module_path(env, os.path.join(request["cwd"], request["argv"][0]))
    for name in PRELOADED_PACKAGES:
        module = sys.modules.get(name)
        spec = PathFinder.find_spec(name, path)
        loaded = getattr(module, "__file__", None)
        if module is not None and (spec is None or spec.origin is None or loaded is None
                                   or os.path.realpath(spec.origin) != os.path.realpath(loaded)):
            return f"its module path finds another {name}"
    return None


def _run_rank(rank: int, nproc: int, port: int, request) -> None:
    """In the forked rank: the job's environment and argv; runs the script; never returns."""
    for sig in FORWARDED:
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.clear()
    os.environ.update(request["env"])
    if nproc > 1:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                          LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0", GROUP_WORLD_SIZE="1", ROLE_RANK=str(rank),
                          ROLE_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    script = request["argv"][0]
    sys.argv = list(request["argv"])
    sys.path[:] = _module_path(request["env"], script)
    import torch

    threads = request["env"].get("OMP_NUM_THREADS") or request["env"].get("MKL_NUM_THREADS")
    torch.set_num_threads(int(threads) if threads and threads.isdigit() and int(threads) > 0
                          else len(os.sched_getaffinity(0)))
    import runpy

    runpy.run_path(script, run_name="__main__")
    raise SystemExit(0)


def _supervise(conn: socket.socket, children: Dict[int, int], nproc: int) -> int:
    failed: Dict[int, int] = {}
    codes: Dict[int, int] = {}
    kill_at: Optional[float] = None
    while children:
        readable, _, _ = select.select([conn], [], [], 0.05)
        if readable:
            data = conn.recv(4096)
            if not data:  # the client is gone (killed): so is the job
                os.killpg(0, signal.SIGKILL)
            for line in data.split(b"\n"):
                if line.startswith(b"S"):
                    for pid in list(children):
                        _kill(pid, int(line[1:]))
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                children.clear()
                break
            if pid == 0:
                break
            rank = children.pop(pid, None)
            if rank is None:
                continue
            codes[rank] = os.waitstatus_to_exitcode(status)
            if codes[rank] != 0:
                failed[rank] = codes[rank]
                if kill_at is None and nproc > 1:  # the first failure: end the others, as torchrun does
                    kill_at = time.time() + GRACE_S
                    for other in list(children):
                        _kill(other, signal.SIGTERM)
        if kill_at is not None and time.time() >= kill_at:
            for other in list(children):
                _kill(other, signal.SIGKILL)
            kill_at = float("inf")
    if nproc == 1:
        return codes.get(0, 1)
    for rank, code in sorted(failed.items()):
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        print(f"zygote: rank {rank} failed ({how})", file=sys.stderr, flush=True)
    return 1 if failed else 0


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "serve":
        serve(sys.argv[2])
    else:
        sys.exit("usage: python -m tests.helpers.zygote serve SOCKET")
