"""A --save folder belongs to one run, and a broken checkpoint file ends every rank with one line naming it.

Uses copies of the shared straight runs (steps 10 and 20) of conftest.py; every file of those steps is
hashed before and after.
"""

import os
import shutil

import pytest

from tests.helpers import ckpt_runs as R
from tests.helpers import ops_checks as C

pytestmark = pytest.mark.slow


def _copy(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("tokenformer_save.lock"))
    return dst


def test_fresh_run_refused_then_overwrite_keeps_the_other_runs_steps(straight_runs, ckpt_workdir):
    _, straight = straight_runs((1, 1, 1))
    save = _copy(straight, os.path.join(ckpt_workdir, "owned"))
    before = C.tree_hashes(save, ["global_step10", "global_step20"])
    # a --load typo: nothing to resume from, so the run must not write over the folder's steps
    r = R.run((1, 1, 1), R.ARCH + R.TRAIN + ["--train-iters", "4", "--save-interval", "1", "--save", save,
                                             "--load", save + "_typo"], check=False, timeout=240)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    line = C.assert_one_error_line(r.stderr)
    assert line == (f"pretrain_tokenformer.py: error: --save {save} already holds checkpoints (global_step10, "
                    f"global_step20; `latest` names global_step20) and this run does not resume from it; resume "
                    f"with --load {save}, choose an empty --save, or pass --overwrite-checkpoints")
    assert "iteration        1/" not in r.stdout
    assert C.tree_hashes(save, ["global_step10", "global_step20"]) == before and C.latest(save) == "global_step20"
    # --overwrite-checkpoints: allowed, but --keep-last-n-checkpoints deletes only this run's own steps
    r = R.run((1, 1, 1), R.ARCH + R.TRAIN + ["--train-iters", "3", "--save-interval", "1", "--save", save,
                                             "--overwrite-checkpoints", "--keep-last-n-checkpoints", "1"], timeout=240)
    assert C.step_names(save) == ["global_step3", "global_step10", "global_step20"], r.stdout[-2000:]
    assert "removed global_step1 (--keep-last-n-checkpoints)" in r.stdout
    assert "removed global_step2 (--keep-last-n-checkpoints)" in r.stdout
    assert C.tree_hashes(save, ["global_step10", "global_step20"]) == before
    assert C.latest(save) == "global_step3" and C.leftovers(save) == []


def test_truncated_checkpoint_file_named_and_every_rank_exits(straight_runs, ckpt_workdir):
    _, straight = straight_runs((2, 1, 1))
    load = R.checkpoint_at(straight, 10, os.path.join(ckpt_workdir, "truncated"))
    victim = os.path.join(load, "global_step10", "mp_rank_01_model_states.pt")
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    before = C.tree_hashes(load)
    save = os.path.join(ckpt_workdir, "truncated_out")
    r = R.run((2, 1, 1), R.ARCH + R.TRAIN + ["--train-iters", "12", "--load", load, "--save", save], check=False,
              timeout=240)
    assert r.returncode != 0
    line = C.assert_one_error_line(r.stderr, torchrun=True)   # every rank agreed; rank 0 prints it
    assert line.startswith(f"pretrain_tokenformer.py: error: checkpoint file {victim} is truncated"), line
    assert "(found by rank " in line
    assert "iteration       11/" not in r.stdout
    assert C.tree_hashes(load) == before
    assert not os.path.exists(save) or C.step_names(save) == []
