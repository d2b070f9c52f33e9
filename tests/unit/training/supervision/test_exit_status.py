"""The exit status line job scripts read to decide on requeueing (training/supervision/exit_status.py)."""

import os
import subprocess

import pytest

from megatron_tokenformer.training.supervision.exit_status import read_exit_status, status_line, write_exit_status


def test_status_lines():
    assert status_line(1000, 1000, "train-iters") == "finished 1000/1000 train-iters"
    assert status_line(437, 1000, "signal SIGUSR1") == "unfinished 437/1000 signal SIGUSR1"


def test_write_then_read(tmp_path):
    path = str(tmp_path / "sub" / "exit_status")
    write_exit_status(path, 5, 20, "signal SIGUSR1")
    assert read_exit_status(path) == {"finished": False, "iteration": 5, "train_iters": 20,
                                      "reason": "signal SIGUSR1"}
    write_exit_status(path, 20, 20, "train-iters")  # replaced, no temporary left behind
    assert read_exit_status(path)["finished"] is True
    assert os.listdir(os.path.dirname(path)) == ["exit_status"]
    assert read_exit_status(str(tmp_path / "missing")) is None


def test_the_shell_test_of_the_batch_scripts(tmp_path):
    """examples/slurm/*.sbatch requeue when the first word is 'unfinished' (and only then)."""
    path = str(tmp_path / "exit_status")
    check = f'[ -f "{path}" ] && [ "$(cut -d" " -f1 "{path}")" = unfinished ]'
    write_exit_status(path, 3, 9, "--exit-duration-in-mins 1.0")
    assert subprocess.run(["bash", "-c", check]).returncode == 0
    write_exit_status(path, 9, 9, "train-iters")
    assert subprocess.run(["bash", "-c", check]).returncode == 1
    os.remove(path)
    assert subprocess.run(["bash", "-c", check]).returncode == 1


def test_garbage_is_refused(tmp_path):
    path = tmp_path / "exit_status"
    path.write_text("done\n")
    with pytest.raises(ValueError, match="not an exit status line"):
        read_exit_status(str(path))
