"""pretrain_tokenformer.py's flags: derived values, and one clear error for every impossible combination,
raised before any process group exists (so no rank waits for another)."""

import json
import re
import sys

import pytest
import torch

from megatron_tokenformer.arguments import ArgumentError, build_parser, parse_args, validate_args
from tests.helpers import train_runs

BASE = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--micro-batch-size", "2", "--train-iters", "10", "--lr", "1e-3", "--mock-data", "--vocab-size", "100"]


def validated(extra, world_size):
    return validate_args(parse_args(BASE + list(extra)), world_size)


def error_of(extra, world_size):
    with pytest.raises(ArgumentError) as info:
        validated(extra, world_size)
    return str(info.value)


# ----------------------------------------------------------------------------- derived values


def test_gradient_accumulation_and_data_parallel_size_are_derived():
    args = validated(["--tensor-model-parallel-size", "2", "--global-batch-size", "16"], world_size=4)
    assert args.data_parallel_size == 2
    assert args.gradient_accumulation_steps == 16 // (2 * 2)
    args = validated([], world_size=4)  # global batch defaults to micro-batch x DP
    assert args.global_batch_size == 2 * 4 and args.gradient_accumulation_steps == 1


def test_tokenformer_defaults_and_warmup_fraction():
    args = validated(["--lr-warmup-fraction", "0.25"], world_size=1)
    assert (args.qkv_num_param_tokens, args.proj_num_param_tokens, args.ffn_num_param_tokens) == (64, 64, 256)
    assert args.max_position_embeddings == 32
    assert args.lr_decay_iters == 10 and args.lr_warmup_iters == 2
    assert args.tokenizer_type == "NullTokenizer"


def test_explicit_flags_are_recorded():
    args = parse_args(BASE + ["--seed", "7", "--bf16"])
    assert {"num_layers", "seed", "bf16", "lr", "mock_data"} <= args._explicit
    assert "hidden_size" in args._explicit and "rotary_percent" not in args._explicit
    assert "zero_stage" not in args._explicit


def test_fused_pattention_norm_defaults_to_cuda_availability(monkeypatch):
    from megatron_tokenformer import arguments
    from megatron_tokenformer.arguments import core_config_from_args, resolve_fused_pattention_norm
    assert [resolve_fused_pattention_norm(flag, cuda) for flag in (None, True, False) for cuda in (False, True)] \
        == [False, True, True, True, False, False]
    # no kernel compiler: the default is off, an explicit request is refused naming the flag and the need
    assert resolve_fused_pattention_norm(None, True, compiler_available=False) is False
    assert resolve_fused_pattention_norm(False, True, compiler_available=False) is False
    for cuda, need in ((True, "Triton"), (False, "a C++ compiler")):
        with pytest.raises(ArgumentError, match=f"--fused-pattention-norm compiles kernels with torch.compile, which "
                                                f"needs {re.escape(need)}.*--no-fused-pattention-norm"):
            resolve_fused_pattention_norm(True, cuda, compiler_available=False)
    monkeypatch.setattr(arguments, "_kernel_compiler_available", lambda cuda: True)
    for cuda in (False, True):
        monkeypatch.setattr(arguments, "_cuda_available", lambda cuda=cuda: cuda)
        assert validated([], world_size=1).fused_pattention_norm is cuda
        assert validated(["--fused-pattention-norm"], world_size=1).fused_pattention_norm is True
        args = validated(["--no-fused-pattention-norm"], world_size=1)
        assert args.fused_pattention_norm is False
        assert core_config_from_args(args, 100).fused_pattention_norm is False
    assert core_config_from_args(validated(["--fused-pattention-norm"], 1), 100).fused_pattention_norm is True


def test_fused_norm_falls_back_when_the_probe_kernel_does_not_compile(monkeypatch):
    """Triton installed (find_spec passes) but its run-time C build fails: the default falls back to the
    plain kernels with one warning line; an explicit --fused-pattention-norm is refused in one line; CPU
    runs and runs that do not use the kernels never probe. The probe itself reports a failing compile."""
    from megatron_tokenformer import arguments
    from megatron_tokenformer.arguments import fused_norm_after_probe
    from megatron_tokenformer.ops.pattention_norm import probe_fused_kernels

    def broken_compile(fn, **kwargs):
        def run(*a):
            raise RuntimeError("Failed to compile launcher: fatal error: Python.h: No such file or directory\n...")
        return run

    error = probe_fused_kernels(torch.device("cpu"), compile_fn=broken_compile)
    assert error.startswith("RuntimeError: Failed to compile launcher: fatal error: Python.h") and "\n" not in error
    assert probe_fused_kernels(torch.device("cpu"), compile_fn=lambda fn, **kw: fn) is None  # a working compile
    assert probe_fused_kernels(torch.device("cpu"), compile_fn=lambda fn, **kw: (lambda t: fn(t) + 1)) \
        == "the compiled probe kernel computed a wrong result"

    calls = []

    def failing():
        calls.append(1)
        return error
    use, warning = fused_norm_after_probe(False, True, "cuda", failing)
    assert use is False and calls == [1]
    assert warning.startswith("warning: the fused Pattention kernels cannot be compiled here (RuntimeError: ")
    assert "plain kernels" in warning and "\n" not in warning
    with pytest.raises(ArgumentError, match=r"^--fused-pattention-norm: torch.compile cannot build a kernel on this "
                                            r"GPU \(RuntimeError: .*--no-fused-pattention-norm$"):
        fused_norm_after_probe(True, True, "cuda", failing)
    calls.clear()
    assert fused_norm_after_probe(False, False, "cuda", failing) == (False, None)  # not used: no probe
    assert fused_norm_after_probe(True, True, "cpu", failing) == (True, None)  # CPU: the compiler check stands
    assert calls == []
    assert fused_norm_after_probe(False, True, "cuda", lambda: None) == (True, None)
    # validate_args records whether the flag was given (the explicit case above)
    monkeypatch.setattr(arguments, "_kernel_compiler_available", lambda cuda: True)
    monkeypatch.setattr(arguments, "_cuda_available", lambda: True)
    assert validated([], world_size=1)._fused_pattention_norm_explicit is False
    assert validated(["--fused-pattention-norm"], world_size=1)._fused_pattention_norm_explicit is True


# ----------------------------------------------------------------------------- one clear error each


def test_global_batch_not_divisible():
    msg = error_of(["--global-batch-size", "10"], world_size=4)  # micro 2 x DP 4 = 8
    assert "--global-batch-size (10)" in msg and "--micro-batch-size (2)" in msg and "8" in msg


def test_tp_times_pp_must_divide_world():
    msg = error_of(["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"], world_size=6)
    assert "--tensor-model-parallel-size (2)" in msg and "--pipeline-model-parallel-size (2)" in msg
    assert "world size (6 ranks)" in msg


def test_layers_not_divisible_by_pipeline_stages():
    msg = error_of(["--pipeline-model-parallel-size", "3"], world_size=3)
    assert "--num-layers (4)" in msg and "--pipeline-model-parallel-size (3)" in msg


def test_zero2_with_pipeline_is_refused():
    msg = error_of(["--zero-stage", "2", "--pipeline-model-parallel-size", "2"], world_size=2)
    assert "--zero-stage 2" in msg and "--zero-stage 1" in msg


def test_seq_length_over_max_positions():
    msg = error_of(["--max-position-embeddings", "16"], world_size=1)
    assert "--seq-length (32)" in msg and "--max-position-embeddings (16)" in msg


@pytest.mark.parametrize("extra, world, needle", [
    (["--fp16", "--bf16"], 1, "--fp16 and --bf16"),
    (["--lr-warmup-iters", "2", "--lr-warmup-fraction", "0.1"], 1, "--lr-warmup-iters or --lr-warmup-fraction"),
    (["--tensor-model-parallel-size", "8"], 8, "--num-attention-heads (4)"),
    (["--tensor-model-parallel-size", "4", "--ffn-num-param-tokens", "6"], 4, "--ffn-num-param-tokens (6)"),
    (["--min-lr", "1"], 1, "--min-lr"),
    (["--fp16", "--initial-loss-scale", "1000"], 1, "--initial-loss-scale"),
    (["--save-interval", "5"], 1, "--save-interval needs --save"),
    (["--lr-warmup-iters", "20"], 1, "--lr-warmup-iters (20)"),
])
def test_other_bad_combinations(extra, world, needle):
    assert needle in error_of(extra, world)


def test_missing_required_flags_and_files(tmp_path):
    with pytest.raises(ArgumentError, match="--lr is required"):
        validate_args(parse_args([a for a in BASE if a not in ("--lr", "1e-3")]), 1)
    no_data = [a for a in BASE if a != "--mock-data"]
    with pytest.raises(ArgumentError, match="--data-path"):
        validate_args(parse_args(no_data), 1)
    missing = str(tmp_path / "corpus_text_document")
    with pytest.raises(ArgumentError, match="corpus_text_document.bin not found"):
        validate_args(parse_args(no_data + ["--data-path", missing]), 1)
    with pytest.raises(ArgumentError, match="--tokenizer-model .*no such file"):
        validate_args(parse_args(BASE + ["--tokenizer-model", str(tmp_path / "none.model")]), 1)


def test_argparse_rejects_unknown_values():
    with pytest.raises(SystemExit):
        parse_args(BASE + ["--lr-decay-style", "exponential"])
    with pytest.raises(SystemExit):
        parse_args(BASE + ["--zero-stage", "3"])


# ----------------------------------------------------------------------------- DeepSpeed JSON


def test_deepspeed_json_fills_flags_not_given(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 16, "gradient_clipping": 0.25, "bf16": {"enabled": True},
                                "zero_optimization": {"stage": 2, "reduce_bucket_size": 1000000}}))
    args = validated(["--deepspeed_config", str(path)], world_size=2)
    assert args.global_batch_size == 16 and args.gradient_accumulation_steps == 4
    assert args.clip_grad == 0.25 and args.bf16 and args.zero_stage == 2
    from megatron_tokenformer.arguments import options_from_args
    from megatron_tokenformer.training.engine import DeepSpeedOptions, build_deepspeed_config
    cfg = build_deepspeed_config(options_from_args(DeepSpeedOptions, args))
    assert cfg["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000000}
    assert cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * 2 == cfg["train_batch_size"]


def test_deepspeed_json_contradicting_an_explicit_flag(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    msg = error_of(["--deepspeed_config", str(path), "--zero-stage", "1"], world_size=1)
    assert "--zero-stage 1" in msg and "zero_optimization.stage = 2" in msg
    path.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    assert '"optimizer" section' in error_of(["--deepspeed_config", str(path)], world_size=1)
    path.write_text("{not json")
    assert "not valid JSON" in error_of(["--deepspeed_config", str(path)], world_size=1)


# ----------------------------------------------------------------------------- the command line


def test_help_is_grouped():
    text = build_parser().format_help()
    for title in ("model architecture", "tokenformer (Pattention)", "training", "optimizer and learning rate",
                  "mixed precision", "parallelism", "data and tokenizer", "checkpointing",
                  "logging and evaluation", "deepspeed"):
        assert f"\n{title}:" in text, title
    out = train_runs.check_ok(train_runs.run([sys.executable, train_runs.SCRIPT, "--help"], timeout=60))
    assert "--tensor-model-parallel-size" in out and "--qkv-num-param-tokens" in out


def test_cli_error_is_one_line_and_exit_code_2():
    result = train_runs.run([sys.executable, train_runs.SCRIPT] + BASE + ["--global-batch-size", "3"], timeout=60)
    assert result.returncode == 2
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert lines == ["pretrain_tokenformer.py: error: --global-batch-size (3) must be a multiple of "
                     "--micro-batch-size (2) x data-parallel size (1 = 1 ranks / (TP 1 x PP 1)) = 2"]


@pytest.mark.slow
def test_bad_layout_under_torchrun_fails_fast_with_one_message():
    """2 ranks, TP = 4: every rank refuses before init_process_group; the message is printed once."""
    cmd = train_runs.torchrun(2, BASE + ["--tensor-model-parallel-size", "4"])
    result = train_runs.run(cmd, timeout=90)
    assert result.returncode != 0
    needle = "pretrain_tokenformer.py: error: --tensor-model-parallel-size (4) x --pipeline-model-parallel-size (1)"
    assert result.stdout.count(needle) == 1, result.stdout[-3000:]
    # no Python traceback from the ranks (torchrun adds its own failure report)
    assert 'pretrain_tokenformer.py", line' not in result.stdout


# ----------------------------------------------------------------------------- --data-path and --split


def _prefixes(tmp_path, *names):
    out = []
    for name in names:
        for ext in (".bin", ".idx"):
            (tmp_path / (name + ext)).write_bytes(b"")  # validate_args only checks that the pair exists
        out.append(str(tmp_path / name))
    return out


NO_MOCK = [a for a in BASE if a != "--mock-data"]


@pytest.mark.parametrize("form", ["one prefix", "weighted pairs", "unweighted list"])
def test_data_path_accepts_megatrons_three_forms(tmp_path, form):
    a, b = _prefixes(tmp_path, "a", "b")
    data_path = {"one prefix": [a], "weighted pairs": ["0.3", a, "0.7", b], "unweighted list": [a, b]}[form]
    args = validate_args(parse_args(NO_MOCK + ["--data-path", *data_path]), 1)
    assert args.data_path == data_path


@pytest.mark.parametrize("data_path, needle", [
    (["0.5", "{a}", "{b}"], "odd count"),
    (["{a}", "0.5", "{b}"], "mixes weights and prefixes"),
    (["-1", "{a}", "1", "{b}"], "must be a non-negative number"),
    (["0", "{a}", "0", "{b}"], "the weights sum to zero"),
    (["{a}", "{missing}"], "missing.bin not found"),
])
def test_bad_data_path_is_one_clear_error(tmp_path, data_path, needle):
    a, b = _prefixes(tmp_path, "a", "b")
    names = {"a": a, "b": b, "missing": str(tmp_path / "missing")}
    msg = error_of_argv(NO_MOCK + ["--data-path"] + [item.format(**names) for item in data_path])
    assert "--data-path" in msg and needle in msg


@pytest.mark.parametrize("split, needle", [("969,x,1", "--split"), ("1,2,3,4", "--split"),
                                           ("0,1,0", "the train part is zero")])
def test_split_is_checked_by_the_data_layer_parser(tmp_path, split, needle):
    (a,) = _prefixes(tmp_path, "a")
    assert needle in error_of_argv(NO_MOCK + ["--data-path", a, "--split", split])
    assert validate_args(parse_args(NO_MOCK + ["--data-path", a, "--split", "969/30/1"]), 1).split == "969/30/1"


def error_of_argv(argv):
    with pytest.raises(ArgumentError) as info:
        validate_args(parse_args(argv), 1)
    return str(info.value)

def test_recompute_flags_as_megatron():
    # --checkpoint-activations is full / uniform / 1 layer
    args = validated(["--checkpoint-activations"], 1)
    assert (args.recompute_granularity, args.recompute_method, args.recompute_num_layers) == ("full", "uniform", 1)
    args = validated(["--recompute-granularity", "full", "--recompute-method", "block",
                      "--recompute-num-layers", "2"], 1)
    assert args.checkpoint_activations and (args.recompute_method, args.recompute_num_layers) == ("block", 2)
    args = validated(["--recompute-granularity", "selective"], 1)
    assert not args.checkpoint_activations and args.recompute_method is None
    from megatron_tokenformer.arguments import core_config_from_args
    config = core_config_from_args(args, 100)
    assert config.recompute_granularity == "selective" and not config.checkpoint_activations


@pytest.mark.parametrize("extra, world, needle", [
    (["--checkpoint-activations", "--recompute-granularity", "selective"], 1, "--checkpoint-activations means"),
    (["--recompute-granularity", "selective", "--recompute-method", "uniform"], 1,
     "apply to --recompute-granularity 'full' only"),
    (["--recompute-num-layers", "2"], 1, "apply to --recompute-granularity 'full' only"),
    (["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "3",
      "--pipeline-model-parallel-size", "2"], 2, "exceeds the 2 blocks of a pipeline stage"),
    (["--sequence-parallel", "--tensor-model-parallel-size", "2", "--seq-length", "33",
      "--max-position-embeddings", "64"], 2, "--seq-length (33) is not divisible by --tensor-model-parallel-size (2)"),
])
def test_recompute_and_sequence_parallel_errors(extra, world, needle):
    assert needle in error_of(extra, world)


def test_sequence_parallel_is_ignored_at_tp1_and_reaches_the_config():
    assert validated(["--sequence-parallel"], 1).sequence_parallel is False
    from megatron_tokenformer.arguments import core_config_from_args
    args = validated(["--sequence-parallel", "--tensor-model-parallel-size", "2"], 2)
    assert args.sequence_parallel and core_config_from_args(args, 100).sequence_parallel


def test_opt_param_scheduler_flags_both_spellings():
    for spelling in ("--override-opt-param-scheduler", "--override-opt_param-scheduler"):
        args = validated([spelling], world_size=1)
        assert args.override_opt_param_scheduler and not args.use_checkpoint_opt_param_scheduler
    for spelling in ("--use-checkpoint-opt-param-scheduler", "--use-checkpoint-opt_param-scheduler"):
        args = validated([spelling], world_size=1)
        assert args.use_checkpoint_opt_param_scheduler and not args.override_opt_param_scheduler
    args = validated([], world_size=1)
    assert not args.override_opt_param_scheduler and not args.use_checkpoint_opt_param_scheduler


def test_opt_param_scheduler_flags_exclude_each_other():
    msg = error_of(["--override-opt_param-scheduler", "--use-checkpoint-opt-param-scheduler"], world_size=1)
    assert "--override-opt-param-scheduler and --use-checkpoint-opt-param-scheduler" in msg


def test_model_flags_are_generated_from_the_config_fields():
    """The model-config flags (names, defaults, groups) come from config.FIELD_FLAGS; the reference is the flag
    list the hand-written parser had, and every generated flag lands in its config field."""
    import argparse as ap

    from megatron_tokenformer.arguments import build_parser, core_config_from_args, parse_args, validate_args
    from megatron_tokenformer.config import FIELD_FLAGS
    reference = {  # flag: (default, --help group) before the generation
        "--model-type": ("tokenformer", "model architecture"), "--num-layers": (None, "model architecture"),
        "--hidden-size": (None, "model architecture"), "--num-attention-heads": (None, "model architecture"),
        "--seq-length": (None, "model architecture"), "--max-position-embeddings": (None, "model architecture"),
        "--make-vocab-size-divisible-by": (128, "model architecture"),
        "--ffn-hidden-size": (None, "model architecture"), "--init-method-std": (0.02, "model architecture"),
        "--qkv-num-param-tokens": (None, "tokenformer (Pattention)"),
        "--proj-num-param-tokens": (None, "tokenformer (Pattention)"),
        "--ffn-num-param-tokens": (None, "tokenformer (Pattention)"),
        "--pattention-normalization": ("l2_norm_gelu", "tokenformer (Pattention)"),
        "--value-init-std": (None, "tokenformer (Pattention)"), "--qkv-tau": (None, "tokenformer (Pattention)"),
        "--proj-tau": (None, "tokenformer (Pattention)"), "--ffn-tau": (None, "tokenformer (Pattention)"),
        "--rotary-percent": (0.25, "tokenformer (Pattention)"), "--checkpoint-activations": (False, "training"),
        "--recompute-granularity": (None, "training"), "--recompute-method": (None, "training"),
        "--recompute-num-layers": (None, "training"), "--fused-pattention-norm": (None, "training"),
        "--sequence-parallel": (False, "parallelism")}
    parser = build_parser()
    found = {}
    for group in parser._action_groups:
        for action in group._group_actions:
            for option in action.option_strings:
                found[option] = (action.default, group.title)
    assert {option: found[option] for option in reference} == reference
    assert sorted("--" + flag.dest.replace("_", "-") for flag in FIELD_FLAGS.values()) == sorted(reference)
    assert isinstance(next(a for a in parser._actions if "--fused-pattention-norm" in a.option_strings),
                      ap.BooleanOptionalAction)

    argv = ["--num-layers", "2", "--hidden-size", "16", "--num-attention-heads", "2", "--seq-length", "8",
            "--micro-batch-size", "1", "--train-iters", "1", "--lr", "1e-3", "--mock-data", "--vocab-size", "50",
            "--qkv-num-param-tokens", "6", "--value-init-std", "0.5", "--ffn-tau", "3", "--rotary-percent", "0.5",
            "--recompute-granularity", "selective", "--pattention-normalization", "softmax"]
    config = core_config_from_args(validate_args(parse_args(argv), 1), 50)
    assert (config.num_layers, config.hidden_size, config.qkv_num_param_tokens, config.proj_num_param_tokens,
            config.ffn_num_param_tokens, config.value_init, config.ffn_tau, config.qkv_tau, config.rotary_percent,
            config.recompute_granularity, config.pattention_normalization, config.vocab_size) == \
        (2, 16, 6, 16, 64, 0.5, 3.0, 6 ** 0.5, 0.5, "selective", "softmax", 50)


# ----------------------------------------------------------------------------- --context-parallel-size


def test_context_parallel_layout_is_derived_and_shown_in_help():
    args = validated(["--context-parallel-size", "2", "--tensor-model-parallel-size", "2", "--global-batch-size", "8"],
                     world_size=8)
    assert (args.context_parallel_size, args.data_parallel_size, args.gradient_accumulation_steps) == (2, 2, 2)
    assert "--context-parallel-size" in build_parser().format_help()


@pytest.mark.parametrize("extra, world, needle", [
    (["--context-parallel-size", "3"], 4,
     "--context-parallel-size (3) x --tensor-model-parallel-size (1) x --pipeline-model-parallel-size (1) = 3 does "
     "not divide the world size (4 ranks)"),
    (["--context-parallel-size", "2", "--tensor-model-parallel-size", "2"], 6,
     "--context-parallel-size (2) x --tensor-model-parallel-size (2) x --pipeline-model-parallel-size (1) = 4 does "
     "not divide the world size (6 ranks)"),
    (["--context-parallel-size", "4", "--seq-length", "36"], 4,
     "--seq-length (36) must be a multiple of 2 x --context-parallel-size (4) = 8"),
    (["--context-parallel-size", "2", "--tensor-model-parallel-size", "2", "--sequence-parallel", "--seq-length", "36"],
     4, "--seq-length (36) must be a multiple of 2 x --context-parallel-size (2) x --tensor-model-parallel-size (2) "
        "(--sequence-parallel) = 8"),
])
def test_invalid_context_parallel_layouts_are_one_line(extra, world, needle):
    msg = error_of(extra, world)
    assert needle in msg and "\n" not in msg, msg
