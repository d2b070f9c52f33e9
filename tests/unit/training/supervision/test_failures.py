"""training/supervision/failures.run: an exit through SystemExit tears the process group down before the interpreter
does (left to teardown, gloo sometimes aborted the process after its error line: exit -6)."""

import pytest
import torch.distributed as dist

from megatron_tokenformer.arguments import ArgumentError
from megatron_tokenformer.checkpointing.file_checks import CheckpointFileError
from megatron_tokenformer.checkpointing.save_dir import SaveDirError, SaveFailedError
from megatron_tokenformer.data.batch_check import TokenIdError
from megatron_tokenformer.errors import EXIT_BAD_INPUT
from megatron_tokenformer.training.supervision import failures
from megatron_tokenformer.training.supervision.numerics import NumericalFailure


@pytest.fixture
def gloo_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    sub = dist.new_group([0])
    yield sub
    if dist.is_initialized():
        dist.destroy_process_group()


def test_a_refused_start_destroys_the_process_group(gloo_group, capsys):
    def main(argv):
        raise SaveDirError("--save /x is in use by another run")

    with pytest.raises(SystemExit) as exc:
        failures.run(main, [])
    assert exc.value.code == EXIT_BAD_INPUT
    assert not dist.is_initialized()
    assert capsys.readouterr().err.strip().splitlines() == [
        "pretrain_tokenformer.py: error: --save /x is in use by another run"]


def test_a_plain_exit_from_main_destroys_it_too(gloo_group):
    def main(argv):
        raise SystemExit(2)  # pretrain_tokenformer._fail after the group exists (e.g. bad data files)

    with pytest.raises(SystemExit):
        failures.run(main, [])
    assert not dist.is_initialized()


def test_a_normal_return_is_left_alone(gloo_group):
    assert failures.run(lambda argv: 0, []) == 0
    assert dist.is_initialized()  # main destroys it itself after its last barrier


def test_without_a_group_nothing_happens():
    assert not dist.is_initialized()
    failures.destroy_process_group_quietly()
    with pytest.raises(SystemExit):
        failures.run(lambda argv: (_ for _ in ()).throw(SystemExit(2)), [])


@pytest.mark.parametrize("exc, code, printed_on_rank_1", [
    (SaveFailedError("saving iteration 4 into --save /s failed on rank 1: ENOSPC"), 1, True),
    (TokenIdError("/d.bin: document 3 holds token id 150"), 2, True),
    (SaveDirError("--save /s is in use"), 2, False),
], ids=["save-failed", "bad-token-id", "save-dir-refused"])
def test_agreed_lines_are_printed_on_every_rank(monkeypatch, capsys, exc, code, printed_on_rank_1):
    """A failed save and a bad batch are agreed with the same line on every rank, and every rank prints it
    (a rank's own log may be all one reads); a refused --save is printed by rank 0 alone."""
    monkeypatch.setenv("RANK", "1")

    def main(argv):
        raise exc

    with pytest.raises(SystemExit) as info:
        failures.run(main, [])
    assert info.value.code == code
    err = capsys.readouterr().err
    assert err == (f"pretrain_tokenformer.py: error: {exc}\n" if printed_on_rank_1 else "")


@pytest.mark.parametrize("exc, code, printed_on_rank_1", [
    (NumericalFailure("iteration 2: the loss is NaN or Inf"), 1, False),
    (CheckpointFileError("/c/global_step2/mp_rank_00_model_states.pt: truncated"), 2, False),
    (ArgumentError("--num-attention-heads 3 must be divisible by --tensor-model-parallel-size 2"), 2, True),
], ids=["numerics", "checkpoint-file", "any-other-package-error"])
def test_every_package_error_ends_in_its_line_and_code(monkeypatch, capsys, exc, code, printed_on_rank_1):
    """The rows of the module's table not covered above, and an error of the package the table does not list:
    it ends in one line on every rank and exit 2 (before the one error base it kept its traceback)."""
    monkeypatch.setenv("RANK", "1")

    def main(argv):
        raise exc

    with pytest.raises(SystemExit) as info:
        failures.run(main, [])
    assert info.value.code == code
    assert capsys.readouterr().err == (f"pretrain_tokenformer.py: error: {exc}\n" if printed_on_rank_1 else "")


def test_exit_code_of_follows_sys_exit(capsys):
    assert [failures.exit_code_of(c) for c in (None, 0, 2, -6)] == [0, 0, 2, -6]
    assert failures.exit_code_of("pretrain_tokenformer.py: error: x") == 1
    assert capsys.readouterr().err == "pretrain_tokenformer.py: error: x\n"


END_PROCESS = """
import atexit, sys, threading, time
import torch.distributed as dist
from megatron_tokenformer.training.supervision import failures
out = sys.argv[1]
dist.init_process_group("gloo", init_method="file://" + out + "/store", rank=0, world_size=1)
dist.new_group([0])
atexit.register(lambda: open(out + "/atexit", "w").write(str(dist.is_initialized())))
def late():
    time.sleep(0.5)
    open(out + "/thread", "w").write("joined")
threading.Thread(target=late).start()
sys.stdout.write("no newline, not flushed")
failures.end_process(int(sys.argv[2]) if sys.argv[2].isdigit() else sys.argv[2])
open(out + "/after", "w").write("end_process returned")
"""


@pytest.mark.parametrize("code, status", [("0", 0), ("3", 3), ("a message", 1)])
def test_end_process_does_what_a_normal_exit_does_that_matters(tmp_path, code, status):
    """The process group destroyed before the exit handlers run, a thread that is not a daemon joined, the exit
    handlers run, buffered output flushed, the status passed through; nothing after it runs."""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-c", END_PROCESS, str(tmp_path), code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == status, proc.stderr
    assert proc.stdout == "no newline, not flushed"
    assert (tmp_path / "atexit").read_text() == "False"
    assert (tmp_path / "thread").read_text() == "joined"
    assert not (tmp_path / "after").exists()
    assert proc.stderr == ("a message\n" if status == 1 else "")
