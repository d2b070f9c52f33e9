"""The process a test starts for a run forked by the zygote server (tests/helpers/zygote.py):
``python -S -I zygote_client.py SOCKET NPROC SCRIPT ARGS...``. Standard library only (it runs without
site-packages, to start in milliseconds).

Hands its argv, environment, working directory and stdin/stdout/stderr to a job manager, forwards the
signals it receives, and exits with the job's status (the same signal, for a one-rank job ended by one)."""

import json
import os
import signal
import socket
import struct
import sys
import time

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)


def main() -> int:
    path, nproc, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
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
