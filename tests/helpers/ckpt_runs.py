"""Helpers for the checkpoint tests: run pretrain_tokenformer.py at a (TP, PP, DP) layout on CPU ranks
and read back every iteration's lm loss (exactly: the fp32 value TensorBoard stores)."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
from typing import Dict, List, Optional, Sequence, Tuple

from tests.helpers.paths import REPO_ROOT as ROOT

SCRIPT = os.path.join(ROOT, "pretrain_tokenformer.py")

# Process handling (free ports, a clean environment, kill-on-timeout) is shared with the training tests.
from tests.helpers.train_runs import communicate_or_kill, env, start, warm_launch  # noqa: E402

# A tiny Tokenformer; global batch 4 = micro batch 2 x gradient accumulation x DP (DP 1 or 2).
ARCH = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--qkv-num-param-tokens", "16", "--proj-num-param-tokens", "16", "--ffn-num-param-tokens", "32"]
TRAIN = ["--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "2e-3", "--lr-warmup-iters", "2",
         "--lr-decay-style", "cosine", "--mock-data", "--vocab-size", "100", "--log-interval", "1",
         "--eval-iters", "0", "--seed", "7", "--zero-stage", "1"]


def command(layout: Tuple[int, int, int], args: Sequence[str]) -> List[str]:
    """``layout``'s ranks on this host: one process or several, forked by the suite's fork server
    (tests/helpers/zygote.py: the imports paid once)."""
    tp, pp, dp = layout
    par = ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]
    return warm_launch(tp * pp * dp, par + list(args))


def run(layout, args, timeout=300, check=True) -> subprocess.CompletedProcess:
    """Run to completion (stderr kept apart); on timeout the whole process group is killed."""
    p = start(command(layout, args), merge_stderr=False)
    out, err = communicate_or_kill(p, timeout)
    proc = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    if check and proc.returncode != 0:
        raise AssertionError(f"run failed ({proc.returncode}): {' '.join(p.args)}\n"
                             f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def losses(tb_dir: str) -> Dict[int, float]:
    """{iteration: lm loss} from the TensorBoard event files under ``tb_dir``."""
    return scalars(tb_dir, "lm loss")


def scalars(tb_dir: str, tag: str) -> Dict[int, float]:
    """{iteration: value} of the scalar ``tag`` (e.g. "learning-rate") from the event files under ``tb_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out: Dict[int, float] = {}
    for path in sorted(glob.glob(os.path.join(tb_dir, "**", "events.out.tfevents.*"), recursive=True)):
        acc = EventAccumulator(path, size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags().get("scalars", []):
            for ev in acc.Scalars(tag):
                out[int(ev.step)] = float(ev.value)
    return out


def train(workdir: str, name: str, layout, iters: int, extra: Sequence[str] = (), timeout=300):
    """Train ``iters`` iterations; returns (losses, save_dir). Saves into workdir/name."""
    save = os.path.join(workdir, name)
    tb = os.path.join(workdir, name + "_tb")
    run(layout, ARCH + TRAIN + ["--train-iters", str(iters), "--save", save, "--tensorboard-dir", tb] + list(extra),
        timeout=timeout)
    return losses(tb), save


def resume(workdir: str, name: str, layout, load: str, iters: int, extra: Sequence[str] = (), arch=True,
           timeout=300, save: Optional[str] = None):
    """Resume from ``load`` up to ``iters`` (saving into ``save``, default workdir/name); returns the
    losses of the resumed iterations and the save dir."""
    tb = os.path.join(workdir, name + "_tb")
    save = save or os.path.join(workdir, name)
    run(layout, (ARCH if arch else []) + TRAIN + ["--train-iters", str(iters), "--load", load, "--save", save,
                                                  "--tensorboard-dir", tb] + list(extra), timeout=timeout)
    return losses(tb), save


def checkpoint_at(src_save: str, iteration: int, dst: str) -> str:
    """A copy of ``src_save`` holding only step ``iteration`` (``latest`` pointing at it)."""
    os.makedirs(dst, exist_ok=True)
    tag = f"global_step{iteration}"
    shutil.copytree(os.path.join(src_save, tag), os.path.join(dst, tag))
    with open(os.path.join(dst, "latest"), "w") as f:
        f.write(tag)
    return dst


def popen(layout, args):
    return subprocess.Popen(command(layout, args), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


__all__ = ["ARCH", "TRAIN", "run", "train", "resume", "losses", "scalars", "checkpoint_at", "popen", "signal", "ROOT"]
