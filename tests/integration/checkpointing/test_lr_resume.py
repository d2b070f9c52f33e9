"""The learning rate across a resume, as Megatron-LM: the LR an update really applied (derived from the
update of a probe parameter and its Adam moments, re-deriving AdamW's step in the test) equals the LR
the run logged, before and after a resume, on the native load path (same layout) and on the resharding
load path (another layout); a schedule that differs from the checkpoint's is refused in one line
unless --override-opt-param-scheduler / --use-checkpoint-opt-param-scheduler says which one to use."""

import os

import pytest

from megatron_tokenformer.checkpointing.format.view import CheckpointView
from megatron_tokenformer.training.lr_schedules import learning_rate
from tests.helpers import ckpt_runs as R

pytestmark = pytest.mark.slow

PROBE = "layers.0.mlp.key_param_tokens"
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8          # AdamW's defaults in arguments.py (the runs do not change them)
# schedule of the first run: 2e-3, 2 warmup updates, cosine over 8; it stops (and saves) at iteration 4
FIRST = ["--train-iters", "8", "--weight-decay", "0", "--save-interval", "1"]
OTHER_LR = ["--lr", "1e-3"]                   # the resumed runs' flags describe another peak LR


def _applied_lr(before: CheckpointView, after: CheckpointView) -> float:
    """The LR of the update from ``before`` to ``after``: AdamW (no weight decay) moved the fp32 master by
    lr * m_hat / (sqrt(v_hat) + eps), with the moments and step count stored in ``after``."""
    w0 = before.read(PROBE).double()
    w1 = after.read(PROBE).double()
    m, v = after.read(PROBE, "exp_avg").double(), after.read(PROBE, "exp_avg_sq").double()
    step = after.params[PROBE].step
    direction = (m / (1 - BETA1 ** step)) / (v.sqrt() / (1 - BETA2 ** step) ** 0.5 + EPS)
    delta = w0 - w1
    return float((delta * direction).sum() / (direction * direction).sum())


def _step_dir(save, it):
    return os.path.join(save, f"global_step{it}")


def _check_applied_equals_logged(dirs_by_iter, logged, iterations):
    for it in iterations:
        with CheckpointView(dirs_by_iter(it - 1)) as a, CheckpointView(dirs_by_iter(it)) as b:
            applied = _applied_lr(a, b)
        assert applied == pytest.approx(logged[it], rel=2e-4), (it, applied, logged[it])


@pytest.fixture(scope="module")
def first_run(ckpt_workdir):
    """Iterations 1..4 of the first schedule, a checkpoint after every one; the source for the resumes."""
    save = os.path.join(ckpt_workdir, "lr_first")
    tb = save + "_tb"
    R.run((1, 1, 1), R.ARCH + R.TRAIN + FIRST + ["--exit-interval", "4", "--save", save, "--tensorboard-dir", tb])
    return save, R.scalars(tb, "learning-rate")


def _resume(ckpt_workdir, first_run, name, layout, extra):
    save, _ = first_run
    load = R.checkpoint_at(save, 4, os.path.join(ckpt_workdir, name + "_src"))
    out = os.path.join(ckpt_workdir, name)
    R.run(layout, R.ARCH + R.TRAIN + FIRST + OTHER_LR + list(extra) + ["--load", load, "--save", out,
                                                                        "--tensorboard-dir", out + "_tb"])
    logged = R.scalars(out + "_tb", "learning-rate")
    assert sorted(logged) == [5, 6, 7, 8]
    return out, logged


def test_first_run_applies_the_logged_lr(first_run):
    save, logged = first_run
    assert sorted(logged) == [1, 2, 3, 4]
    for it in (1, 2, 3, 4):                       # the schedule, as the formula gives it
        assert logged[it] == pytest.approx(learning_rate(it - 1, 2e-3, 0.0, 2, 8, "cosine"), rel=1e-6)
    _check_applied_equals_logged(lambda it: _step_dir(save, it), logged, (2, 3, 4))


@pytest.mark.parametrize("layout", [(1, 1, 1), (1, 1, 2)], ids=["native", "resharding"])
def test_override_applies_the_flags_schedule_from_the_first_update(first_run, ckpt_workdir, layout):
    out, logged = _resume(ckpt_workdir, first_run, "lr_override_%d%d%d" % layout, layout,
                          ["--override-opt-param-scheduler"])
    for it in (5, 6, 7, 8):                       # the flags' peak LR, at the checkpoint's step count
        assert logged[it] == pytest.approx(learning_rate(it - 1, 1e-3, 0.0, 2, 8, "cosine"), rel=1e-6)
    src = os.path.join(ckpt_workdir, "lr_override_%d%d%d_src" % layout)
    _check_applied_equals_logged(lambda it: _step_dir(src if it == 4 else out, it), logged, (5, 6, 7, 8))


@pytest.mark.parametrize("layout", [(1, 1, 1)], ids=["native"])
def test_use_checkpoint_schedule(first_run, ckpt_workdir, layout):
    out, logged = _resume(ckpt_workdir, first_run, "lr_ckpt_%d%d%d" % layout, layout,
                          ["--use-checkpoint-opt_param-scheduler"])
    for it in (5, 6, 7, 8):                       # the checkpoint's peak LR despite --lr 1e-3
        assert logged[it] == pytest.approx(learning_rate(it - 1, 2e-3, 0.0, 2, 8, "cosine"), rel=1e-6)
    src = os.path.join(ckpt_workdir, "lr_ckpt_%d%d%d_src" % layout)
    _check_applied_equals_logged(lambda it: _step_dir(src if it == 4 else out, it), logged, (5, 6))


def test_other_schedule_refused_in_one_line(first_run, ckpt_workdir):
    """(The same check refuses on the resharding path: both paths hand the state to the scheduler.)"""
    save, _ = first_run
    load = R.checkpoint_at(save, 4, os.path.join(ckpt_workdir, "lr_refused_src"))
    out = os.path.join(ckpt_workdir, "lr_refused")
    proc = R.run((1, 1, 1), R.ARCH + R.TRAIN + FIRST + OTHER_LR + ["--lr-decay-iters", "6", "--load", load,
                                                                   "--save", out], check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert not os.path.exists(os.path.join(out, "latest"))           # nothing trained, nothing saved
    lines = [line for line in proc.stderr.splitlines()
             if line.startswith("pretrain_tokenformer.py: error: ") and "learning-rate schedule" in line]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "--lr 0.001 (checkpoint: 0.002)" in lines[0] and "--lr-decay-iters 6 (checkpoint: 8" in lines[0]
    assert "--override-opt-param-scheduler" in lines[0]
