"""The process a test starts for a run forked by the zygote server (tests/helpers/zygote.py):
``python -S -I zygote_client.py SOCKET NPROC SCRIPT ARGS...``. Standard library only (it runs without
site-packages, to start in milliseconds).

Hands its argv, environment, working directory and stdin/stdout/stderr to a job manager, forwards the
signals it receives, and exits with the job's status (the same signal, for a one-rank job ended by one).
Where the server refuses the run (see ``zygote._refusal``) it runs the plain command instead.

``zygote_client.py --as python|torchrun ARGS...`` is what the ``python``/``python3``/``torchrun`` stand-ins in
``zygote_bin/`` run (``zygote.shim_env``): the socket and the real programs come from the environment
(ZYGOTE_SOCKET, ZYGOTE_REAL_PYTHON, ZYGOTE_REAL_TORCHRUN); a command line it does not recognise as a
script run is handed to the real program unchanged."""

import json
import os
import signal
import socket
import struct
import sys
import time

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)


# torchrun's options for a one-host job that the fork server reproduces (value-taking, then flags)
_TORCHRUN_VALUES = {"--nproc_per_node", "--nproc-per-node", "--master_addr", "--master-addr", "--master_port",
                    "--master-port", "--nnodes", "--node_rank", "--node-rank"}
_TORCHRUN_FLAGS = {"--standalone"}


def parse_torchrun(args):
    """``(nproc, [script, *script_args])`` of a torchrun command line for one host, or None."""
    options, i = {}, 0
    while i < len(args) and args[i].startswith("-"):
        name, eq, value = args[i].partition("=")
        if name in _TORCHRUN_FLAGS and not eq:
            i += 1
            continue
        if name not in _TORCHRUN_VALUES:
            return None
        if not eq:
            if i + 1 >= len(args):
                return None
            value, i = args[i + 1], i + 1
        options[name.replace("-", "_")] = value
        i += 1
    if i >= len(args) or not args[i].endswith(".py"):
        return None
    nproc = options.get("__nproc_per_node", "1")
    if not nproc.isdigit() or int(nproc) < 1 or options.get("__nnodes", "1") not in ("1", "1:1") \
            or options.get("__node_rank", "0") != "0":
        return None
    return int(nproc), args[i:]


def parse_python(args):
    """``(nproc, [script, *script_args])`` of a python command line that runs a script (one process) or
    torch.distributed.run (torchrun), or None."""
    if args[:2] == ["-m", "torch.distributed.run"]:
        return parse_torchrun(args[2:])
    if args and args[0].endswith(".py") and not args[0].startswith("-"):
        return 1, args
    return None


def as_stand_in(kind, args):
    real = os.environ.get("ZYGOTE_REAL_TORCHRUN" if kind == "torchrun" else "ZYGOTE_REAL_PYTHON")
    if not real:
        print(f"zygote_client: the {kind} stand-in needs ZYGOTE_REAL_{kind.upper()}", file=sys.stderr)
        return 127
    plain = [real] + args
    job = parse_torchrun(args) if kind == "torchrun" else parse_python(args)
    path = os.environ.get("ZYGOTE_SOCKET")
    if job is None or not path or not os.path.exists(path):
        os.execv(real, plain)
    nproc, argv = job
    return run(path, nproc, argv, plain)


def plain_command(nproc, argv):
    if nproc == 1:
        return [sys.executable] + argv
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] + argv


def main() -> int:
    if sys.argv[1] == "--as":
        return as_stand_in(sys.argv[2], sys.argv[3:])
    path, nproc, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    return run(path, nproc, argv, plain_command(nproc, argv))


def run(path, nproc, argv, plain) -> int:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    deadline = time.time() + 300
    while True:
        try:
            conn.connect(path)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            if time.time() > deadline:
                print(f"zygote_client: no server at {path}", file=sys.stderr, flush=True)
                return 1
            time.sleep(0.05)
    body = json.dumps({"argv": argv, "nproc": nproc, "env": dict(os.environ), "cwd": os.getcwd()}).encode()
    socket.send_fds(conn, [struct.pack("!Q", len(body)) + body], [0, 1, 2])

    def forward(signum, _frame):
        try:
            conn.sendall(b"S%d\n" % signum)
        except OSError:
            pass

    for sig in FORWARDED:
        signal.signal(sig, forward)
    buf = b""
    while b"\n" not in buf:
        data = conn.recv(64)
        if not data:
            print("zygote_client: the job manager went away", file=sys.stderr, flush=True)
            return 1
        buf += data
    if buf.startswith(b"R"):  # refused: the plain command, in this process (so signals reach it directly)
        conn.close()
        for sig in FORWARDED:
            signal.signal(sig, signal.SIG_DFL)
        os.execv(plain[0], plain)
    code = int(buf[1:buf.index(b"\n")])
    if code < 0:  # ended by a signal: end the same way
        if -code not in (signal.SIGKILL, signal.SIGSTOP):  # those two cannot be caught: already default
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        time.sleep(1)
        return 128 - code
    return code


if __name__ == "__main__":
    sys.exit(main())
