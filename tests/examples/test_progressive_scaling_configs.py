"""examples/progressive_scaling: every stage's flags build the model the README describes.

* Each stage's flags (configs/common.args + configs/tokenformer_<STAGE>.args) go through the training
  script's own parser and validation; the model is built on the meta device (no memory, no init
  cost) and its parameter count must equal the closed form P(n) = 147456 n + 38635008 worked out in
  the README (written here independently: 12 blocks x 16 d n + V_pad d + 2 d) and lie within 0.5% of
  the stage's target.
* The Slurm script is run with stand-in ``srun``/``scontrol``/python that record their command lines:
  the growth command it runs must be the README's, and the README's growth commands must parse with
  tools/expand_checkpoint.py's own parser and name the next stage's token counts; a stage whose run
  reports "unfinished" requeues its job, and a stage is never grown from an unfinished predecessor.
  (tests/examples/test_progressive_scaling_slurm.py runs the script on a real Slurm cluster.)
"""

import importlib.util
import os
import re
import shlex
import stat
import subprocess

import pytest
import torch

from megatron_tokenformer.arguments import core_config_from_args, parse_args, validate_args
from megatron_tokenformer.model import TokenformerLM

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.join(ROOT, "examples", "progressive_scaling")
STAGES = {"124M": 124e6, "354M": 354e6, "757M": 757e6, "1400M": 1.4e9}
TOKENIZER_VOCAB = 50257  # the README's tokenizer (GPT-2's size), padded to 50304 at TP = 1


def read_args(path):
    with open(path) as f:
        return shlex.split(f.read(), comments=True)


def stage_argv(stage):
    return read_args(os.path.join(HERE, "configs", "common.args")) + \
        read_args(os.path.join(HERE, "configs", f"tokenformer_{stage}.args"))


def closed_form(n, d=768, layers=12, padded_vocab=50304):
    return layers * 2 * d * (n + n + n + n + 4 * n) + padded_vocab * d + 2 * d


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_parameter_count_on_meta_device(stage):
    argv = stage_argv(stage) + ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "50000",
                                "--save", "/ckpt/unused"]
    args = parse_args(argv)
    tp = args.tensor_model_parallel_size
    validate_args(args, world_size=tp * 16)  # e.g. 16 data-parallel replicas
    config = core_config_from_args(args, TOKENIZER_VOCAB)
    n = config.qkv_num_param_tokens
    assert config.proj_num_param_tokens == n and config.ffn_num_param_tokens == 4 * n
    assert (config.num_layers, config.hidden_size, config.num_attention_heads) == (12, 768, 12)
    assert config.model_type == "tokenformer" and config.block_layernorm == "nonparametric"
    assert n % tp == 0
    with torch.device("meta"):
        model = TokenformerLM(config)
    assert next(model.parameters()).device.type == "meta"
    count = sum(p.numel() for p in model.parameters())
    assert count == closed_form(n)
    assert abs(count / STAGES[stage] - 1) < 0.005, (stage, count)
    # the README and the stage file quote the same number
    readme = open(os.path.join(HERE, "README.md")).read()
    assert f"{count:,}" in readme
    assert f"{count:,}" in open(os.path.join(HERE, "configs", f"tokenformer_{stage}.args")).read()


def test_stages_only_grow_tokens():
    counts = []
    for stage in STAGES:
        args = parse_args(stage_argv(stage))
        counts.append((args.qkv_num_param_tokens, args.proj_num_param_tokens, args.ffn_num_param_tokens))
    assert counts == sorted(counts) and len(set(counts)) == len(counts)


def _load_tool_parser():
    spec = importlib.util.spec_from_file_location("expand_checkpoint_tool", os.path.join(ROOT, "tools",
                                                                                          "expand_checkpoint.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


def readme_expand_commands():
    text = open(os.path.join(HERE, "README.md")).read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = block.replace("\\\n", " ")
        commands += [line.strip() for line in joined.splitlines() if "tools/expand_checkpoint.py" in line]
    return commands


def test_readme_growth_commands_parse_and_match_the_stages():
    parser = _load_tool_parser()
    commands = readme_expand_commands()
    assert len(commands) == 3
    stages = list(STAGES)
    for command, (prev, stage) in zip(commands, zip(stages, stages[1:])):
        argv = shlex.split(command.replace("$RUN_DIR", "/ckpt"))
        assert argv[:2] == ["python", "tools/expand_checkpoint.py"]
        opts = parser.parse_args(argv[2:])
        target = parse_args(stage_argv(stage))
        assert (opts.load, opts.save) == (f"/ckpt/{prev}", f"/ckpt/{stage}-grown")
        assert (opts.qkv_num_param_tokens, opts.proj_num_param_tokens, opts.ffn_num_param_tokens) == \
            (target.qkv_num_param_tokens, target.proj_num_param_tokens, target.ffn_num_param_tokens)
        assert opts.target_tensor_model_parallel_size == target.tensor_model_parallel_size
        assert opts.reset_optimizer and opts.reset_iteration


def _fake_bin(tmp_path):
    """srun / scontrol / python stand-ins that append their command lines to calls.log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    scripts = {
        # `scontrol show hostnames` prints the first node; every other call is recorded
        "scontrol": "#!/bin/bash\n"
                    + f"if [ \"$1\" = show ]; then echo node001; else printf '%s\\n' \"scontrol $*\" >> {log}; fi\n",
        # the ranks' exit status line (FAKE_EXIT_STATUS) goes to the file named by --exit-status-file
        "srun": "#!/bin/bash\n" + f"printf '%s\\n' \"srun $*\" >> {log}\n"
                "while [ $# -gt 0 ]; do if [ \"$1\" = --exit-status-file ] && [ -n \"$FAKE_EXIT_STATUS\" ]; then "
                "echo \"$FAKE_EXIT_STATUS\" > \"$2\"; fi; shift; done\n",
        "fakepython": "#!/bin/bash\n" + f"printf '%s\\n' \"python $*\" >> {log}\n",
    }
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(body)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return bin_dir, log


@pytest.mark.parametrize("stage,nodes", [("124M", 2), ("757M", 4)])
def test_sbatch_runs_the_documented_commands(tmp_path, stage, nodes):
    bin_dir, log = _fake_bin(tmp_path)
    run_dir = tmp_path / "run"
    data = tmp_path / "owt_text_document"
    for path in (tmp_path / "owt_text_document.bin", tmp_path / "owt_text_document.idx", tmp_path / "tok.model"):
        path.write_bytes(b"")  # validate_args only checks that they exist
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=str(bin_dir / "fakepython"),
               REPO=ROOT, STAGE=stage, DATA_PATH=str(data), TOKENIZER_MODEL=str(tmp_path / "tok.model"),
               RUN_DIR=str(run_dir), SLURM_NNODES=str(nodes),
               SLURM_JOB_ID="77", SLURM_JOB_NODELIST="node[001-004]")
    if stage != "124M":  # the previous stage has finished
        prev = list(STAGES)[list(STAGES).index(stage) - 1]
        (run_dir / prev).mkdir(parents=True)
        (run_dir / prev / "exit_status").write_text("finished 60000/60000 train-iters\n")
    subprocess.run(["bash", os.path.join(HERE, "progressive_scaling.sbatch")], env=env, check=True,
                   capture_output=True, text=True)
    calls = log.read_text().splitlines()
    train = calls[-1]
    assert train.startswith("srun ") and f"{ROOT}/pretrain_tokenformer.py" in train
    train_argv = shlex.split(train)
    train_argv = train_argv[train_argv.index(f"{ROOT}/pretrain_tokenformer.py") + 1:]
    args = validate_args(parse_args(train_argv), nodes * 8)
    assert args.save == f"{run_dir}/{stage}" and args.data_path == [str(data)]
    if stage == "124M":
        assert len(calls) == 1 and args.load == f"{run_dir}/124M"
        return
    assert len(calls) == 2 and args.load == f"{run_dir}/{stage}-grown"
    expected = [c for c in readme_expand_commands() if f"--save $RUN_DIR/{stage}-grown" in c][0]
    expected = shlex.split(expected.replace("$RUN_DIR", str(run_dir)))[1:]
    got = shlex.split(calls[0])[1:]
    assert got[0] == f"{ROOT}/tools/expand_checkpoint.py" and got[1:] == expected[1:]
    assert args.data_parallel_size == 16 and args.tensor_model_parallel_size == 2


def test_sbatch_refuses_an_unknown_stage(tmp_path):
    env = dict(os.environ, STAGE="2B", DATA_PATH="x", TOKENIZER_MODEL="y", RUN_DIR=str(tmp_path), REPO=ROOT)
    proc = subprocess.run(["bash", os.path.join(HERE, "progressive_scaling.sbatch")], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "STAGE must be 124M, 354M, 757M or 1400M, got '2B'" in proc.stderr


def _stage_env(tmp_path, bin_dir, stage, **extra):
    for path in (tmp_path / "d.bin", tmp_path / "d.idx", tmp_path / "tok.model"):
        path.write_bytes(b"")
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=str(bin_dir / "fakepython"),
                REPO=ROOT, STAGE=stage, DATA_PATH=str(tmp_path / "d"), TOKENIZER_MODEL=str(tmp_path / "tok.model"),
                RUN_DIR=str(tmp_path / "run"), SLURM_NNODES="2", SLURM_JOB_ID="77",
                SLURM_JOB_NODELIST="node[001-002]", **extra)


@pytest.mark.parametrize("status, requeued", [("unfinished 437/600000 signal SIGUSR1", True),
                                              ("finished 600000/600000 train-iters", False), ("", False)])
def test_sbatch_requeues_its_job_until_the_stage_is_finished(tmp_path, status, requeued):
    """The ranks' exit status decides: "unfinished" (time-limit warning) requeues the job, so Slurm never
    marks it COMPLETED and an afterok dependant keeps waiting; "finished" or no status (a crash) does not."""
    bin_dir, log = _fake_bin(tmp_path)
    env = _stage_env(tmp_path, bin_dir, "124M", FAKE_EXIT_STATUS=status)
    stale = tmp_path / "run" / "124M" / "exit_status"
    stale.parent.mkdir(parents=True)
    stale.write_text("finished 1/1 from an earlier job\n")  # removed before the run: never read as this run's
    proc = subprocess.run(["bash", os.path.join(HERE, "progressive_scaling.sbatch")], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    train = shlex.split(calls[0])
    # the ranks start with SIGUSR1 ignored (inherited until the training loop handles it)
    assert train[:5] == ["srun", "--kill-on-bad-exit=1", "--cpu-bind=none", "bash", "-c"]
    assert "trap" in calls[0] and "USR1" in calls[0]
    assert train[train.index("--exit-status-file") + 1] == str(stale)
    assert calls[1:] == (["scontrol requeue 77"] if requeued else [])
    assert ("requeueing job 77" in proc.stdout) == requeued
    if not status:
        assert not stale.exists()


@pytest.mark.parametrize("status", ["unfinished 437/600000 signal SIGUSR1", None])
def test_sbatch_refuses_to_grow_an_unfinished_stage(tmp_path, status):
    bin_dir, log = _fake_bin(tmp_path)
    env = _stage_env(tmp_path, bin_dir, "354M")
    if status:
        (tmp_path / "run" / "124M").mkdir(parents=True)
        (tmp_path / "run" / "124M" / "exit_status").write_text(status + "\n")
    proc = subprocess.run(["bash", os.path.join(HERE, "progressive_scaling.sbatch")], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"progressive_scaling.sbatch: error: stage 124M has not finished ({tmp_path}/run/124M/exit_status: "
        f"{status or 'missing'}); submit 354M with --dependency=afterok:<the 124M job>"]
    assert not log.exists()  # nothing grown, nothing trained
    assert not (tmp_path / "run" / "354M-grown").exists()
