"""Load-time checks: architecture flags come from the checkpoint unless given, tau always does, and a
checkpoint that contradicts explicit flags is refused with every differing field listed."""

import os
import subprocess

import pytest

from megatron_tokenformer.arguments import core_config_from_args, parse_args
from megatron_tokenformer.checkpoint_args import apply_checkpoint_args
from megatron_tokenformer.checkpointing import io
from megatron_tokenformer.config import TokenformerConfig
from tests.helpers import ckpt_runs as R
from tests.helpers.train_runs import warm_launch

pytestmark = pytest.mark.slow


def test_flags_filled_from_checkpoint(straight_runs):
    _, save = straight_runs((1, 1, 1))
    args = parse_args(["--load", save, "--micro-batch-size", "1"])
    ckpt = apply_checkpoint_args(args)
    assert (args.num_layers, args.hidden_size, args.num_attention_heads) == (2, 32, 4)
    assert (args.qkv_num_param_tokens, args.proj_num_param_tokens, args.ffn_num_param_tokens) == (16, 16, 32)
    # tau reaches the model config through the checkpoint's config, not through args
    config = core_config_from_args(args, 101, ckpt)
    assert (config.qkv_tau, config.proj_tau, config.ffn_tau) == (4.0, 4.0, 32 ** 0.5)
    assert args.seq_length == 16
    # explicit flags that agree are fine; without --use-checkpoint-args nothing is filled in
    args = parse_args(["--load", save, "--num-layers", "2", "--no-use-checkpoint-args"])
    ckpt = apply_checkpoint_args(args)
    assert args.num_layers == 2 and args.hidden_size is None and ckpt.config_overrides()["qkv_tau"] == 4.0
    # no checkpoint yet: nothing happens (the run starts from scratch)
    args = parse_args(["--load", os.path.join(save, "no_such_dir")])
    assert apply_checkpoint_args(args) is None
    assert args.num_layers is None


def test_mismatching_flags_refused_with_all_fields(straight_runs):
    _, save = straight_runs((1, 1, 1))
    with pytest.raises(io.CheckpointMismatchError) as err:
        apply_checkpoint_args(parse_args(["--load", save, "--hidden-size", "64", "--ffn-num-param-tokens", "64",
                                             "--num-layers", "2", "--pattention-normalization", "softmax"]))
    msg = str(err.value)
    assert "--hidden-size 64 (checkpoint: 32)" in msg and "--ffn-num-param-tokens 64 (checkpoint: 32)" in msg
    assert "--pattention-normalization softmax (checkpoint: l2_norm_gelu)" in msg and "--num-layers 2 (" not in msg


def test_built_model_checked_against_checkpoint(straight_runs):
    _, save = straight_runs((1, 1, 1))
    step = os.path.join(save, "global_step10")
    from megatron_tokenformer.checkpointing.format.metadata import read_meta
    cfg = read_meta(step)["model_config"]
    config = TokenformerConfig.from_dict(dict(cfg, vocab_size=120, qkv_tau=3.0))
    with pytest.raises(io.CheckpointMismatchError) as err:
        io.check_config_matches(config, cfg, step)
    assert "vocab_size: model 120 vs checkpoint 101" in str(err.value) and "qkv_tau" in str(err.value)
    io.check_config_matches(TokenformerConfig.from_dict(cfg), cfg, step)


def test_pretrain_refuses_mismatch_cleanly(straight_runs):
    _, save = straight_runs((1, 1, 1))
    cmd = warm_launch(1, ["--load", save, "--hidden-size", "48", "--num-attention-heads", "3",
           "--micro-batch-size", "1", "--train-iters", "30", "--lr", "1e-3", "--mock-data", "--vocab-size", "100"])
    proc = subprocess.run(cmd, cwd=R.ROOT, env=R.env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--hidden-size 48 (checkpoint: 32)" in proc.stderr
    assert "--num-attention-heads 3 (checkpoint: 4)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_pretrain_refuses_other_vocabulary_cleanly(straight_runs):
    """Passes the flag checks (vocabulary comes from the tokenizer) but not the built model's check."""
    _, save = straight_runs((1, 1, 1))
    cmd = warm_launch(1, ["--load", save, "--micro-batch-size", "1", "--train-iters", "30", "--lr", "1e-3",
           "--mock-data", "--vocab-size", "120", "--eval-iters", "0"])
    proc = subprocess.run(cmd, cwd=R.ROOT, env=R.env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "vocab_size: model 121 vs checkpoint 101" in proc.stderr and "Traceback" not in proc.stderr


def test_resume_checks_the_tokenizer_content_and_the_data(tmp_path):
    """Issue 20 item 6, through pretrain_tokenformer.py: a run on SentencePiece tokenizer A and dataset X;
    resuming with tokenizer B of the same vocabulary size is refused (before: accepted, and the next step
    shipped B), another --split of X is refused, another --data-path trains with one note line."""
    import json

    import numpy as np

    from megatron_tokenformer.data.preprocess import preprocess
    from megatron_tokenformer.data.tokenizer import train_sentencepiece
    rng = np.random.default_rng(0)
    words = [["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"],
             ["red", "green", "blue", "cyan", "pink", "white", "black", "brown"]]
    toks = []
    for i, vocab in enumerate(words):                  # two tokenizers of one size trained on other text
        lines = [" ".join(rng.choice(vocab, 12)) for _ in range(300)]
        toks.append(train_sentencepiece(iter(lines), str(tmp_path / f"tok{i}"), 290, num_threads=1))
        with open(tmp_path / f"text{i}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": line}) + "\n" for line in lines)
    for i in (0, 1):
        preprocess([str(tmp_path / f"text{i}.jsonl")], str(tmp_path / f"data{i}"), tokenizer_model=toks[0],
                   append_eod=True, log=lambda msg: None)
    data = [str(tmp_path / f"data{i}_text_document") for i in (0, 1)]
    train = [f for f in R.TRAIN if f not in ("--mock-data",)]
    train = train[:train.index("--vocab-size")] + train[train.index("--vocab-size") + 2:]
    save = str(tmp_path / "run")
    common = R.ARCH + train + ["--tokenizer-model", toks[0], "--split", "90,10,0", "--data-path", data[0],
                               "--lr-decay-iters", "10"]
    R.run((1, 1, 1), common + ["--train-iters", "2", "--save", save])
    resumes = {"tokenizer": ["--tokenizer-model", toks[1]], "split": ["--split", "80,20,0"],
               "data": ["--data-path", data[1]]}
    procs = {k: R.start(R.command((1, 1, 1), common + ["--train-iters", "3", "--load", save, "--save",
                                                       str(tmp_path / f"resumed_{k}")] + v), merge_stderr=False)
             for k, v in resumes.items()}
    out = {k: (p, *R.communicate_or_kill(p, 300)) for k, p in procs.items()}
    p, stdout, stderr = out["tokenizer"]
    assert p.returncode == 2 and stderr.strip().count("\n") == 0, stderr
    assert stderr.startswith(f"pretrain_tokenformer.py: error: the tokenizer {toks[1]} differs from the one "
                             f"{save}/global_step2 was trained with") and "--override-checkpoint-tokenizer" in stderr
    p, stdout, stderr = out["split"]
    assert p.returncode == 2 and stderr.startswith("pretrain_tokenformer.py: error: --split 80,20,0 differs "), stderr
    p, stdout, stderr = out["data"]
    assert p.returncode == 0, stderr[-3000:]
    notes = [line for line in stdout.splitlines() if line.startswith("note: --data-path")]
    assert len(notes) == 1 and "its 8 consumed samples" in notes[0] and data[0] in notes[0], stdout[-3000:]
    assert os.path.isdir(str(tmp_path / "resumed_data" / "global_step3"))
    assert not os.path.exists(str(tmp_path / "resumed_tokenizer")) or \
        not [n for n in os.listdir(str(tmp_path / "resumed_tokenizer")) if n.startswith("global_step")]
