"""Checkpoints are data: a file that would run code is refused, a changed byte is found, on every load path.

Every path -- training --load (DeepSpeed's own torch.load behind it), tools/expand_checkpoint.py --dry-run,
export_hf.py, generate.py, evaluate_checkpoint.py -- gets a copy of a real checkpoint (the shared straight
runs of conftest.py, step 10) with a ``__reduce__`` payload (``touch MARKER``) planted in one of its files:
refused in one line naming the file and the global, exit non-zero, and the marker is NOT created. A byte
flipped inside a tensor record (the zip structure intact) is refused by training, expand_checkpoint and
export_hf naming the file, and found by tools/verify_checkpoint.py; real checkpoints pass. (The official
importer's DeepSpeed folders: tests/unit/interop/test_official.py.) The tools run in this process.
"""

import os

import pytest

from tests.helpers import ckpt_runs as R
from tests.helpers import ops_checks as C
from tests.helpers.paths import load_tool
from tests.helpers.tamper import PAYLOAD_GLOBAL, flip_tensor_byte, plant_payload

pytestmark = pytest.mark.slow

MODEL = "mp_rank_00_model_states.pt"
SHARD = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
RNG = "tokenformer_rng_rank_00000.pt"


def _copy(straight, dst):
    return R.checkpoint_at(straight, 10, dst)


def _refusal(path):
    return f"checkpoint file {path}: refused: its pickle names {PAYLOAD_GLOBAL}, which no checkpoint"


def _one_line(err, prog):
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: ") and "Traceback" not in err, err
    return lines[0][len(f"{prog}: error: "):]


@pytest.fixture(scope="module")
def planted(straight_runs, ckpt_workdir):
    """file kind -> (checkpoint copy with a payload in that file, the file, the marker)."""
    _, straight = straight_runs((1, 1, 1))
    out = {}
    for kind in (MODEL, SHARD, RNG):
        load = _copy(straight, os.path.join(ckpt_workdir, "planted_" + kind.split("_")[0]))
        victim = os.path.join(load, "global_step10", kind)
        marker = os.path.join(ckpt_workdir, "marker_" + kind)
        plant_payload(victim, marker)
        out[kind] = (load, victim, marker)
    return out


def test_training_load_refuses_pickled_code(planted, ckpt_workdir):
    load, victim, marker = planted[MODEL]   # DeepSpeed's own model file, which its loader torch.loads
    before = C.tree_hashes(load)
    r = R.run((1, 1, 1), R.ARCH + R.TRAIN + ["--train-iters", "12", "--load", load], check=False, timeout=240)
    assert r.returncode != 0
    line = C.assert_one_error_line(r.stderr)
    assert line.startswith("pretrain_tokenformer.py: error: " + _refusal(victim)) and "(found by rank 0)" in line, line
    assert not os.path.exists(marker) and "iteration       11/" not in r.stdout
    assert C.tree_hashes(load) == before


@pytest.mark.parametrize("tool, kind", [("expand_checkpoint", SHARD), ("export_hf", MODEL), ("generate", RNG),
                                        ("evaluate_checkpoint", SHARD)])
def test_tools_refuse_pickled_code(tool, kind, planted, ckpt_workdir, capsys):
    if tool == "export_hf":
        pytest.importorskip("safetensors")
    load, victim, marker = planted[kind]
    out = os.path.join(ckpt_workdir, f"out_{tool}")
    text = os.path.join(ckpt_workdir, "held_out.txt")
    with open(text, "w") as f:
        f.write("a b c d e f g h " * 20)
    argv = {"expand_checkpoint": ["--load", load, "--save", out, "--dry-run", "--target-tensor-model-parallel-size",
                                  "2"],
            "export_hf": ["--load", load, "--save", out],
            "generate": ["--load", load, "--prompt", "a b", "--max-new-tokens", "2", "--ids"],
            "evaluate_checkpoint": ["--load", load, "--text", text]}[tool]
    code = load_tool(tool).main(argv)
    captured = capsys.readouterr()
    assert code not in (0, None), captured.out[-2000:]
    assert _one_line(captured.err, f"{tool}.py").startswith(_refusal(victim)), captured.err
    assert not os.path.exists(marker) and not os.path.exists(out)


@pytest.fixture(scope="module")
def flipped(straight_runs, ckpt_workdir):
    """A TP 2 checkpoint copy with one byte flipped inside the tensor data of rank 1's ZeRO shard."""
    _, straight = straight_runs((2, 1, 1))
    load = _copy(straight, os.path.join(ckpt_workdir, "flipped"))
    victim = os.path.join(load, "global_step10", "zero_pp_rank_0_mp_rank_01_optim_states.pt")
    flip_tensor_byte(victim)
    return load, victim


def _corrupt(path):
    return f"checkpoint file {path} is corrupt: its xxh3_64 checksum is "


def test_training_load_refuses_a_flipped_byte(flipped, ckpt_workdir):
    load, victim = flipped
    save = os.path.join(ckpt_workdir, "flipped_out")
    r = R.run((2, 1, 1), R.ARCH + R.TRAIN + ["--train-iters", "12", "--load", load, "--save", save], check=False,
              timeout=240)
    assert r.returncode != 0
    line = C.assert_one_error_line(r.stderr, torchrun=True)   # the ranks split the files; rank 0 prints
    assert line.startswith("pretrain_tokenformer.py: error: " + _corrupt(victim)) and "(found by rank " in line, line
    assert "iteration       11/" not in r.stdout
    assert not os.path.exists(save) or C.step_names(save) == []


@pytest.mark.parametrize("tool", ["expand_checkpoint", "export_hf"])
def test_tools_refuse_a_flipped_byte(tool, flipped, ckpt_workdir, capsys):
    if tool == "export_hf":
        pytest.importorskip("safetensors")
    load, victim = flipped
    out = os.path.join(ckpt_workdir, f"flipped_{tool}")
    extra = ["--target-tensor-model-parallel-size", "1"] if tool == "expand_checkpoint" else []
    code = load_tool(tool).main(["--load", load, "--save", out] + extra)
    captured = capsys.readouterr()
    assert code not in (0, None)
    assert _one_line(captured.err, f"{tool}.py").startswith(_corrupt(victim)), captured.err
    assert not os.path.exists(out)


def test_verify_checkpoint_finds_the_byte_and_passes_real_checkpoints(flipped, straight_runs, capsys):
    load, victim = flipped
    verify = load_tool("verify_checkpoint")
    assert verify.main(["--load", load]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith(f"{os.path.join(load, 'global_step10')}: BAD: " + _corrupt(victim)), captured.out
    for layout in ((1, 1, 1), (2, 1, 1)):   # every step of real runs: every file kind, checksums recorded
        _, straight = straight_runs(layout)
        assert verify.main(["--load", straight]) == 0
        out = capsys.readouterr().out.splitlines()
        assert len(out) == 2 and all(": ok (" in l and "allowed globals, checksums)" in l for l in out), out
