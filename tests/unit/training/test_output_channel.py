"""training/output_channel.py: a write to a closed stdout/stderr (EPIPE, EIO) is dropped and becomes an exit
request, instead of a BrokenPipeError that kills the rank."""

import os
import subprocess
import sys
import textwrap

import pytest

from megatron_tokenformer.training import output_channel
from tests.helpers import train_runs


@pytest.fixture
def clean_channel():
    output_channel.uninstall()
    yield
    output_channel.uninstall()


def _pipe_with_closed_reader():
    """A text stream writing into a pipe whose read end is closed (what a dropped ssh session leaves)."""
    r, w = os.pipe()
    os.close(r)
    return os.fdopen(w, "w", buffering=1)


def test_write_to_a_closed_pipe_is_dropped_and_recorded(clean_channel):
    raw = _pipe_with_closed_reader()
    with pytest.raises(BrokenPipeError):  # what a rank used to die of (Python ignores SIGPIPE)
        raw.write("a log line\n")
    stream = output_channel.GuardedStream(raw, "stdout")
    assert output_channel.reason() is None
    print("iteration 7 | lm loss ...", file=stream, flush=True)
    assert output_channel.reason() == "the output channel closed (stdout: Broken pipe)"
    # the descriptor now points at /dev/null: later writes (also from C code) succeed and go nowhere
    assert os.readlink(f"/proc/self/fd/{raw.fileno()}") == os.devnull
    assert stream.write("more\n" * 10000) == len("more\n" * 10000)
    stream.flush()
    assert stream.fileno() == raw.fileno() and stream.isatty() is False  # the rest is forwarded
    raw.close()


def test_hung_up_terminal_eio_is_dropped_and_recorded(clean_channel):
    master, slave = os.openpty()
    os.close(master)  # the terminal hung up: writes to it fail with EIO
    raw = os.fdopen(slave, "w", buffering=1)
    with pytest.raises(OSError):
        raw.write("x\n")
    stream = output_channel.GuardedStream(raw, "stderr")
    stream.write("pretrain_tokenformer.py: a line\n")
    stream.flush()
    assert output_channel.reason() == "the output channel closed (stderr: Input/output error)"
    raw.close()


def test_first_failure_is_the_reason(clean_channel):
    out = output_channel.GuardedStream(_pipe_with_closed_reader(), "stdout")
    err = output_channel.GuardedStream(_pipe_with_closed_reader(), "stderr")
    out.write("a\n")
    err.write("b\n")
    assert output_channel.reason() == "the output channel closed (stdout: Broken pipe)"


def test_install_wraps_both_streams_once(clean_channel):
    real_out, real_err = sys.stdout, sys.stderr
    output_channel.install()
    output_channel.install()
    assert isinstance(sys.stdout, output_channel.GuardedStream) and sys.stdout.wrapped is real_out
    assert isinstance(sys.stderr, output_channel.GuardedStream) and sys.stderr.wrapped is real_err
    output_channel.uninstall()
    assert sys.stdout is real_out and sys.stderr is real_err


PRINTER = textwrap.dedent("""
    import sys, time
    {guard}
    print("ready", flush=True)
    sys.stdin.readline()                      # the parent closes our stdout's reader, then says go
    for i in range(3):
        print(f"log line {{i}}", flush=True)
    sys.stderr.write("an error line\\n")
    open(sys.argv[1], "w").write(str(__import__("megatron_tokenformer.training.output_channel",
                                             fromlist=["reason"]).reason()))
""")


@pytest.mark.parametrize("guarded", [True, False])
def test_process_survives_its_reader_going_away(tmp_path, guarded):
    """A real process whose stdout and stderr readers go away: guarded, it carries on and exits 0; unguarded
    (the reference: what a rank did before), it dies of BrokenPipeError."""
    guard = "from megatron_tokenformer.training import output_channel; output_channel.install()" if guarded else ""
    marker = tmp_path / "reason"
    proc = subprocess.Popen([sys.executable, "-c", PRINTER.format(guard=guard), str(marker)], env=train_runs.env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        proc.stdout.close()   # the reader (ssh, pdsh, tee) is gone
        proc.stdin.write("go\n")
        proc.stdin.close()
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    if guarded:
        assert code == 0
        assert marker.read_text() == "the output channel closed (stdout: Broken pipe)"
    else:
        assert code != 0 and not marker.exists()
