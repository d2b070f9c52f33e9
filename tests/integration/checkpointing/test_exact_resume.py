"""Exact resume: 20 iterations straight == 10, stop, --load, 10 more (bitwise lm loss, fp32 on CPU).

Also: SIGTERM mid-run saves and exits 0, and the resumed run matches; a save killed (SIGKILL) at
any phase leaves `latest` on the previous complete step and the run resumes from it exactly;
--no-load-optim / --finetune load what Megatron loads; the step folder carries the metadata.
"""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from tests.helpers import ckpt_runs as R
from tests.helpers import zygote

pytestmark = pytest.mark.slow

ITERS = list(range(1, 21))


@pytest.mark.parametrize("layout", [(1, 1, 1), (2, 1, 1), (1, 2, 2)], ids=["tp1pp1dp1", "tp2pp1dp1", "tp1pp2dp2"])
def test_exact_resume(layout, straight_runs, ckpt_workdir):
    ref, save = straight_runs(layout)
    assert sorted(ref) == ITERS
    name = "resume_%d%d%d" % layout
    load = R.checkpoint_at(save, 10, os.path.join(ckpt_workdir, name + "_src"))
    got, _ = R.resume(ckpt_workdir, name, layout, load, 20)
    assert sorted(got) == ITERS[10:]
    for it in ITERS[10:]:
        assert got[it] == ref[it], f"iteration {it}: resumed {got[it]!r} != straight {ref[it]!r}"


def test_sequence_parallel_resume_either_way(straight_runs, ckpt_workdir):
    """The checkpoint does not depend on --sequence-parallel: a TP = 2 checkpoint written without it is
    resumed with it (iterations 11-15, saving step 15), and that one is resumed without it (16-20); the
    losses equal the straight run's (1e-5 relative: the reduction order differs, the function does not)."""
    ref, save = straight_runs((2, 1, 1))
    load = R.checkpoint_at(save, 10, os.path.join(ckpt_workdir, "sp_resume_src"))
    # --train-iters 20 with --exit-interval 15 keeps the learning-rate schedule of the straight run
    got_sp, sp_save = R.resume(ckpt_workdir, "sp_resume", (2, 1, 1), load, 20,
                               ["--sequence-parallel", "--exit-interval", "15"])
    got_plain, _ = R.resume(ckpt_workdir, "sp_resume_back", (2, 1, 1), sp_save, 20)
    assert sorted(got_sp) == ITERS[10:15] and sorted(got_plain) == ITERS[15:]
    for it, loss in {**got_sp, **got_plain}.items():
        assert loss == pytest.approx(ref[it], rel=1e-5), f"iteration {it}: {loss!r} != straight {ref[it]!r}"


def test_checkpoint_contents(straight_runs):
    _, save = straight_runs((1, 1, 1))
    assert open(os.path.join(save, "latest")).read().strip() == "global_step20"
    assert sorted(n for n in os.listdir(save) if n.startswith("global_step")) == ["global_step10", "global_step20"]
    step = os.path.join(save, "global_step10")
    meta = json.load(open(os.path.join(step, "tokenformer_checkpoint.json")))
    assert meta["kind"] == "deepspeed" and meta["iteration"] == 10 and meta["consumed_samples"] == 40
    cfg = meta["model_config"]
    assert (cfg["qkv_num_param_tokens"], cfg["proj_num_param_tokens"], cfg["ffn_num_param_tokens"]) == (16, 16, 32)
    assert cfg["qkv_tau"] == pytest.approx(4.0) and cfg["ffn_tau"] == pytest.approx(32 ** 0.5)
    assert meta["layout"] == {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
                              "data_parallel_size": 1, "world_size": 1, "zero_stage": 1, "precision": "fp32"}
    assert meta["args"]["global_batch_size"] == 4 and meta["args"]["lr"] == 2e-3
    files = set(os.listdir(step))
    assert {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "tokenformer_rng_rank_00000.pt"} <= files
    rng = torch.load(os.path.join(step, "tokenformer_rng_rank_00000.pt"), weights_only=False)
    assert {"python", "numpy", "torch", "tracker"} <= set(rng) and "model-parallel-rng" in rng["tracker"]
    model = torch.load(os.path.join(step, "mp_rank_00_model_states.pt"), weights_only=False)
    assert model["lr_scheduler"]["num_steps"] == 10 and model["global_steps"] == 10


def test_every_rank_rng_saved(straight_runs):
    _, save = straight_runs((1, 2, 2))
    step = os.path.join(save, "global_step10")
    assert sorted(n for n in os.listdir(step) if n.startswith("tokenformer_rng")) == \
        [f"tokenformer_rng_rank_{r:05d}.pt" for r in range(4)]


def test_sigterm_saves_and_resumes_exactly(straight_runs, ckpt_workdir):
    ref, _ = straight_runs((1, 1, 1))
    save = os.path.join(ckpt_workdir, "sigterm")
    proc = R.popen((1, 1, 1), R.ARCH + R.TRAIN + ["--train-iters", "20", "--save", save])
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "iteration        3/" in line:
                proc.send_signal(signal.SIGTERM)
                break
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(lines) + out
    assert proc.returncode == 0, text[-3000:]
    assert "signal SIGTERM" in text
    stopped = int(open(os.path.join(save, "latest")).read().strip().replace("global_step", ""))
    assert 3 <= stopped < 20, text[-2000:]
    got, _ = R.resume(ckpt_workdir, "sigterm_resumed", (1, 1, 1), save, 20)
    assert sorted(got) == ITERS[stopped:]
    for it in ITERS[stopped:]:
        assert got[it] == ref[it], f"iteration {it}: {got[it]!r} != {ref[it]!r}"


KILLER = r"""
import os, signal, sys
sys.path.insert(0, {root!r})
phase, at = os.environ["KILL_PHASE"], "global_step" + os.environ["KILL_AT"]
from megatron_tokenformer.checkpointing.format import files
import deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine as tce

def die():
    os.kill(os.getpid(), signal.SIGKILL)

orig_save = tce.TorchCheckpointEngine.save
def save(self, state_dict, path, *a, **k):
    r = orig_save(self, state_dict, path, *a, **k)
    if phase == "deepspeed-files" and at + ".partial" in str(getattr(path, "name", path)):  # a path or a file object
        die()
    return r
tce.TorchCheckpointEngine.save = save

orig_publish = files.publish_step_dir
def publish(partial, final):
    if phase == "before-rename" and final.endswith(at):
        die()
    r = orig_publish(partial, final)
    if phase == "before-latest" and final.endswith(at):
        die()
    return r
files.publish_step_dir = publish

orig_latest = files.update_latest
def latest(save_dir, tag):
    if phase == "writing-latest" and tag == at:
        with open(os.path.join(save_dir, "latest.tmp"), "w") as f:
            f.write("glob")   # a torn write of the temporary file
        die()
    return orig_latest(save_dir, tag)
files.update_latest = latest

import pretrain_tokenformer
sys.exit(pretrain_tokenformer.main(sys.argv[1:]))
"""


def test_kill_during_save_resumes_from_previous_step(straight_runs, ckpt_workdir):
    ref, _ = straight_runs((1, 1, 1))
    save = os.path.join(ckpt_workdir, "killed")
    script = os.path.join(ckpt_workdir, "killer.py")
    with open(script, "w") as f:
        f.write(KILLER.format(root=R.ROOT))
    args = R.ARCH + R.TRAIN + ["--train-iters", "20", "--save-interval", "2", "--save", save, "--load", save]
    for phase in ("deepspeed-files", "before-rename", "before-latest", "writing-latest"):
        env = R.env()
        env.update(KILL_PHASE=phase, KILL_AT="4")
        # forked by the suite's fork server (tests/helpers/zygote.py): the status is still the rank's SIGKILL
        cmd = zygote.launch_command(1, script, args, env, [sys.executable, script] + args)
        proc = subprocess.run(cmd, cwd=R.ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == -signal.SIGKILL, (phase, proc.stdout[-2000:], proc.stderr[-2000:])
        if phase == "deepspeed-files":  # the first run found nothing to resume from
            assert f"no checkpoint found in {save}, starting from scratch" in proc.stdout
        assert open(os.path.join(save, "latest")).read().strip() == "global_step2", phase
        # the interrupted step is never what `latest` names; a partial folder may remain until the next save
        assert os.path.isfile(os.path.join(save, "global_step2", "tokenformer_checkpoint.json"))
    got, _ = R.resume(ckpt_workdir, "killed_resumed", (1, 1, 1), save, 20, save=save,
                      extra=["--save-interval", "2", "--keep-last-n-checkpoints", "2"])
    assert sorted(got) == ITERS[2:]
    for it in ITERS[2:]:
        assert got[it] == ref[it], f"iteration {it}: {got[it]!r} != {ref[it]!r}"
    # the resumed run's saves cleaned up what the killed saves left behind
    leftovers = [n for n in os.listdir(save) if n.endswith(".partial") or n.endswith(".old") or n.endswith(".tmp")]
    assert leftovers == []
    assert open(os.path.join(save, "latest")).read().strip() == "global_step20"
    assert sorted(n for n in os.listdir(save) if n.startswith("global_step")) == ["global_step18", "global_step20"]


def _reference_loss(step_dir, samples):
    """lm loss of the checkpoint's weights on the given mock samples, computed without DeepSpeed."""
    from megatron_tokenformer.checkpointing.format.view import CheckpointView
    from megatron_tokenformer.checkpointing.reshard import load_module_from_view
    from megatron_tokenformer.data.gpt_dataset import MockGPTDataset
    from megatron_tokenformer.model import TokenformerLM
    with CheckpointView(step_dir) as view:
        model = TokenformerLM(view.config)
        load_module_from_view(model, view, view.config)
        ds = MockGPTDataset(10 ** 4, view.config.seq_length, 101, seed=7)
        with torch.no_grad():
            text = torch.stack([torch.as_tensor(ds[i]["text"]) for i in samples]).long()
            return float(model(text[:, :-1], text[:, 1:]))   # mean over all tokens of the global batch


def test_no_load_optim_and_finetune(straight_runs, ckpt_workdir):
    ref, save = straight_runs((1, 1, 1))
    load = R.checkpoint_at(save, 10, os.path.join(ckpt_workdir, "nlo_src"))
    # --no-load-optim: weights and iteration from the checkpoint, fresh Adam moments
    # (--train-iters 12 also shortens the LR decay the checkpoint was written with: keep the flags' schedule)
    got, _ = R.resume(ckpt_workdir, "nlo", (1, 1, 1), load, 12, ["--no-load-optim", "--override-opt-param-scheduler"])
    assert sorted(got) == [11, 12]
    assert got[11] == ref[11]           # same weights, same batch (the loss precedes the update)
    assert got[12] != ref[12]           # a different update (no moments)
    # --finetune: weights only, iteration 0, data from the start
    got, _ = R.resume(ckpt_workdir, "ft", (1, 1, 1), load, 2, ["--finetune"])
    assert sorted(got) == [1, 2]
    expected = _reference_loss(os.path.join(load, "global_step10"), range(4))
    assert got[1] == pytest.approx(expected, rel=1e-6, abs=0)


def test_exit_duration_saves_and_exits_zero(ckpt_workdir):
    save = os.path.join(ckpt_workdir, "timed_out")
    proc = R.run((1, 1, 1), R.ARCH + R.TRAIN + ["--train-iters", "20", "--save", save,
                                                "--exit-duration-in-mins", "0.0001"])
    assert proc.returncode == 0
    assert "exiting at iteration 1 (--exit-duration-in-mins" in proc.stdout
    assert open(os.path.join(save, "latest")).read().strip() == "global_step1"
