"""Command-line arguments of ``pretrain_tokenformer.py`` (Megatron-LM's flag names).

Two steps, both before any process group exists:

* :func:`parse_args` turns the command line into a namespace and records which flags the user
  gave explicitly (``args._explicit``, used by checkpoint loading to decide which architecture
  flags the checkpoint may fill in).
* :func:`validate_args` checks every combination that cannot work -- batch sizes that do not divide,
  a layout that does not fit the world size, ZeRO-2 with pipeline parallelism, ... -- and derives
  the data-parallel size and the gradient-accumulation steps. It raises :class:`ArgumentError`
  with one message naming the flag(s); ``pretrain_tokenformer.py`` prints it on rank 0 only and
  exits with status 2 on every rank, so no rank is left waiting in a collective.

The world size comes from the launcher's environment (:mod:`megatron_tokenformer.launch`), so a
layout that does not fit is refused before ``init_process_group``.

The model-config flags are not written here: :func:`build_parser` generates them from the config fields'
metadata (:data:`megatron_tokenformer.config.FIELD_FLAGS`), and :func:`core_config_from_args` fills every
such field from its flag. Below the entry point the code receives typed records (frozen dataclasses), built
from the validated namespace by :func:`options_from_args` / :func:`engine_options`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from typing import TYPE_CHECKING, Callable, Iterable, Optional, Sequence, Tuple, Type, TypeVar

from megatron_tokenformer.config import (
    ARCHITECTURE,
    FIELD_FLAGS,
    MODEL_FAMILY_FIELDS,
    PARALLELISM,
    PATTENTION,
    TRAINING,
    ModelConfig,
)
from megatron_tokenformer.data.blending import parse_data_prefix
from megatron_tokenformer.data.gpt_dataset import parse_split
from megatron_tokenformer.errors import TokenformerError

if TYPE_CHECKING:
    from megatron_tokenformer.checkpointing.options import CheckpointOptions
    from megatron_tokenformer.training.engine import EngineOptions

R = TypeVar("R")

__all__ = ["ArgumentError", "options_from_args", "engine_options", "build_parser", "parse_args", "validate_args",
           "core_config_from_args", "load_deepspeed_json"]


class ArgumentError(TokenformerError, ValueError):
    """An impossible flag combination; the message names the flag(s)."""


class _RankZeroParser(argparse.ArgumentParser):
    """argparse that prints usage errors on global rank 0 only (the launcher sets ``RANK``)."""

    def error(self, message):  # noqa: D401 - argparse API
        if os.environ.get("RANK", "0") in ("0", ""):
            self.print_usage(sys.stderr)
            sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _nonneg_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


_FLAG_TYPES = {"positive_int": _positive_int, "positive_float": _positive_float, "float": float, "str": None}


def _add_model_flags(group, name: str) -> None:
    """The flags of the model config fields whose :class:`~megatron_tokenformer.config.Flag` is in ``--help``
    group ``name``, generated from the field metadata (config.py), in field order."""
    for flag in FIELD_FLAGS.values():
        if flag.group != name:
            continue
        option = "--" + flag.dest.replace("_", "-")
        if flag.kind == "switch":
            group.add_argument(option, action="store_true", help=flag.help)
        elif flag.kind == "optional_switch":
            group.add_argument(option, action=argparse.BooleanOptionalAction, default=flag.default, help=flag.help)
        else:
            group.add_argument(option, type=_FLAG_TYPES[flag.kind], default=flag.default, help=flag.help,
                               choices=list(flag.choices) if flag.choices else None)


def build_parser(prog: str = "pretrain_tokenformer.py") -> argparse.ArgumentParser:
    parser = _RankZeroParser(
        prog=prog,
        description="Pretrain a Tokenformer language model with tensor, pipeline and data parallelism "
                    "on DeepSpeed (Megatron-LM flag names). Runs on GPUs (nccl) or CPUs (gloo).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )

    g = parser.add_argument_group(ARCHITECTURE)
    _add_model_flags(g, ARCHITECTURE)

    g = parser.add_argument_group(PATTENTION)
    _add_model_flags(g, PATTENTION)
    g.add_argument("--train-only-new-param-tokens", action=argparse.BooleanOptionalAction, default=None,
                   help="after a growth (--load of a checkpoint grown by tools/expand_checkpoint.py), train only the "
                        "parameter tokens the last growth added and the final LayerNorm; every other value stays "
                        "bitwise unchanged. Recorded in the checkpoints, so a resume keeps it without the flag; "
                        "--no-train-only-new-param-tokens trains everything again")

    g = parser.add_argument_group(TRAINING)
    g.add_argument("--micro-batch-size", type=_positive_int, default=None,
                   help="samples per rank per forward/backward")
    g.add_argument("--global-batch-size", type=_positive_int, default=None,
                   help="samples per optimizer step (= micro-batch x gradient accumulation x data parallel; "
                        "default: micro-batch x data parallel)")
    g.add_argument("--train-iters", type=_positive_int, default=None, help="optimizer steps to train for")
    _add_model_flags(g, TRAINING)
    g.add_argument("--seed", type=int, default=1234, help="random seed (model init, data order)")
    g.add_argument("--exit-interval", type=_positive_int, default=None,
                   help="save (if --save) and exit after the iteration that is a multiple of this")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="save (if --save) and exit once training has run this many minutes")
    g.add_argument("--exit-status-file", default=None,
                   help="rank 0 writes 'finished I/N reason' or 'unfinished I/N reason' here at exit (job "
                        "scripts requeue on 'unfinished'; see training/supervision/exit_status.py)")

    g = parser.add_argument_group("optimizer and learning rate")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the decay")
    g.add_argument("--lr-decay-style", default="linear", choices=["constant", "linear", "cosine"])
    g.add_argument("--lr-decay-iters", type=_positive_int, default=None,
                   help="iterations to decay over (default: --train-iters)")
    g.add_argument("--lr-warmup-iters", type=_nonneg_int, default=None,
                   help="linear warmup iterations (default 0)")
    g.add_argument("--lr-warmup-fraction", type=float, default=None,
                   help="warmup as a fraction of --lr-decay-iters (instead of --lr-warmup-iters)")
    g.add_argument("--override-opt-param-scheduler", "--override-opt_param-scheduler",
                   dest="override_opt_param_scheduler", action="store_true",
                   help="on resume, use the schedule these flags describe even where the checkpoint's differs "
                        "(its step count is kept)")
    g.add_argument("--use-checkpoint-opt-param-scheduler", "--use-checkpoint-opt_param-scheduler",
                   dest="use_checkpoint_opt_param_scheduler", action="store_true",
                   help="on resume, use the checkpoint's schedule (max/min LR, warmup, decay iterations, style) "
                        "instead of these flags'")
    g.add_argument("--weight-decay", type=float, default=0.01,
                   help="decoupled weight decay (AdamW); LayerNorm weights and biases get none")
    g.add_argument("--clip-grad", type=float, default=1.0,
                   help="clip the global gradient norm (over all TP/PP ranks) to this; 0 disables")
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)

    g = parser.add_argument_group("mixed precision")
    g.add_argument("--fp16", action="store_true", help="fp16 weights/activations, fp32 master weights, "
                                                      "dynamic loss scaling")
    g.add_argument("--bf16", action="store_true", help="bf16 weights/activations, fp32 master weights")
    g.add_argument("--loss-scale", type=float, default=None,
                   help="static fp16 loss scale (default: dynamic loss scaling)")
    g.add_argument("--initial-loss-scale", type=float, default=2.0 ** 32,
                   help="first dynamic loss scale (a power of two)")
    g.add_argument("--min-loss-scale", type=float, default=1.0, help="dynamic loss scale floor")
    g.add_argument("--loss-scale-window", type=_positive_int, default=1000,
                   help="steps without overflow before the dynamic loss scale doubles")
    g.add_argument("--hysteresis", type=_positive_int, default=2,
                   help="overflows tolerated before the dynamic loss scale halves")
    g.add_argument("--check-for-nan-in-loss-and-grad", dest="check_for_nan_in_loss_and_grad",
                   action="store_true", default=True,
                   help="end the run (one error line naming the iteration, nothing saved) when the loss or the "
                        "gradient norm is NaN/Inf in fp32/bf16 (default: on)")
    g.add_argument("--no-check-for-nan-in-loss-and-grad", dest="check_for_nan_in_loss_and_grad",
                   action="store_false")
    g.add_argument("--max-skipped-iterations", type=_positive_int, default=100,
                   help="fp16: end the run after more than this many consecutive steps skipped for overflow")

    g = parser.add_argument_group(PARALLELISM)
    g.add_argument("--tensor-model-parallel-size", type=_positive_int, default=1,
                   help="ranks that split each Pattention's parameter tokens (and the vocabulary)")
    g.add_argument("--pipeline-model-parallel-size", type=_positive_int, default=1,
                   help="pipeline stages (1F1B schedule); layers split by parameter count")
    g.add_argument("--context-parallel-size", type=_positive_int, default=1,
                   help="ranks that split each sequence (2 x CP chunks, rank r keeping chunks r and 2CP-1-r; K/V "
                        "all-gathered in attention); world = TP x PP x CP x DP; the sequence length must be a "
                        "multiple of 2 x CP (x TP with --sequence-parallel)")
    _add_model_flags(g, PARALLELISM)
    g.add_argument("--zero-stage", type=int, default=1, choices=[1, 2],
                   help="ZeRO stage: 1 shards optimizer states over data-parallel ranks (any pipeline size), "
                        "2 also gradients (pipeline size 1 only)")
    g.add_argument("--distributed-backend", default="auto", choices=["auto", "nccl", "gloo"],
                   help="torch.distributed backend (auto: nccl with CUDA, gloo otherwise)")
    g.add_argument("--distributed-timeout-minutes", type=_positive_float, default=10.0,
                   help="bound on every collective: a rank that stops answering for this long ends the run "
                        "(fractions allowed)")
    g.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                   help="set by the deepspeed launcher; ignored (LOCAL_RANK is read from the environment)")

    g = parser.add_argument_group("data and tokenizer")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="dataset prefix(es) of .bin/.idx files, Megatron syntax: P, w1 P1 w2 P2 ..., or P1 P2 ... "
                        "(weighted by their sizes)")
    g.add_argument("--split", default="969,30,1", help="train,valid,test proportions of --data-path")
    g.add_argument("--mock-data", action="store_true",
                   help="synthetic random tokens (MockGPTDataset) instead of --data-path; for tests")
    g.add_argument("--data-cache-path", default=None, help="where to cache the dataset index files")
    g.add_argument("--num-workers", type=_nonneg_int, default=2,
                   help="data-loader worker processes per rank (0: load in the training process)")
    g.add_argument("--tokenizer-type", default=None,
                   choices=["SentencePieceTokenizer", "HFTokenizer", "HuggingFaceTokenizer", "NullTokenizer"],
                   help="default: SentencePieceTokenizer with --tokenizer-model, HFTokenizer with --vocab-file, "
                        "NullTokenizer with --vocab-size only")
    g.add_argument("--tokenizer-model", default=None,
                   help="SentencePiece .model file; HuggingFaceTokenizer: tokenizer.json or a folder holding one")
    g.add_argument("--vocab-file", default=None, help="HFTokenizer (GPT-NeoX's name): a Hugging Face tokenizer.json")
    g.add_argument("--vocab-size", type=_positive_int, default=None,
                   help="vocabulary size for NullTokenizer / --mock-data (tests)")

    g = parser.add_argument_group("checkpointing")
    g.add_argument("--save", default=None, help="directory to save checkpoints to")
    g.add_argument("--load", default=None, help="directory to resume from (its `latest` step)")
    g.add_argument("--save-interval", type=_positive_int, default=None, help="iterations between saves")
    g.add_argument("--no-load-optim", action="store_true", help="do not load optimizer state")
    g.add_argument("--no-load-rng", action="store_true", help="do not load RNG states")
    g.add_argument("--finetune", action="store_true",
                   help="load weights only and start from iteration 0 (no optimizer, RNG or sample count)")
    g.add_argument("--keep-last-n-checkpoints", type=_positive_int, default=None,
                   help="delete older checkpoints after a successful save (only steps this run wrote)")
    g.add_argument("--overwrite-checkpoints", action="store_true",
                   help="let a run that does not resume from --save write into a --save folder that already "
                        "holds step folders (refused without it)")
    g.add_argument("--use-checkpoint-args", dest="use_checkpoint_args", action="store_true", default=True,
                   help="take architecture flags not given on the command line from the checkpoint")
    g.add_argument("--no-use-checkpoint-args", dest="use_checkpoint_args", action="store_false")
    g.add_argument("--override-checkpoint-tokenizer", action="store_true",
                   help="resume --load with another tokenizer than the checkpoint's (compared by content; refused "
                        "without this flag)")
    g.add_argument("--override-checkpoint-split", action="store_true",
                   help="resume --load on the same --data-path with another --split (refused without this flag: "
                        "held-out documents would move into training)")

    g = parser.add_argument_group("logging and evaluation")
    g.add_argument("--log-interval", type=_positive_int, default=100, help="iterations between log lines")
    g.add_argument("--eval-interval", type=_positive_int, default=1000,
                   help="iterations between validation runs")
    g.add_argument("--eval-iters", type=_nonneg_int, default=100,
                   help="global batches per validation run (0 disables evaluation)")
    g.add_argument("--tensorboard-dir", default=None, help="write TensorBoard scalars here")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s of one device for MFU (default: H100 989, A100 312; CPU: MFU n/a)")

    g = parser.add_argument_group("deepspeed")
    g.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", default=None,
                   help="DeepSpeed JSON config; keys it leaves out are built from the flags above, keys it "
                        "sets must agree with flags given explicitly")
    g.add_argument("--deepspeed", action="store_true",
                   help="accepted for compatibility with DeepSpeed launch scripts (DeepSpeed is always used)")
    return parser


def _explicit_dests(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set:
    """The dest names that appear on the command line (re-parse with every default suppressed)."""
    saved = [(a, a.default) for a in parser._actions]
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        namespace, _ = parser.parse_known_args(list(argv))
    finally:
        for action, default in saved:
            action.default = default
    return set(vars(namespace))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the command line; sets ``args._explicit`` (dests given explicitly)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args._explicit = _explicit_dests(parser, argv)
    return args


# --------------------------------------------------------------------------- DeepSpeed JSON


_JSON_FLAG_KEYS = [
    # (json path, args dest, flag name)
    (("train_micro_batch_size_per_gpu",), "micro_batch_size", "--micro-batch-size"),
    (("train_batch_size",), "global_batch_size", "--global-batch-size"),
    (("gradient_clipping",), "clip_grad", "--clip-grad"),
    (("zero_optimization", "stage"), "zero_stage", "--zero-stage"),
    (("fp16", "enabled"), "fp16", "--fp16"),
    (("bf16", "enabled"), "bf16", "--bf16"),
]


def _json_get(cfg: dict, path):
    node = cfg
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def load_deepspeed_json(args: argparse.Namespace) -> dict:
    """Read ``--deepspeed_config`` and reconcile it with the flags (see the flag's help).

    A JSON value fills a flag the user did not give; a JSON value that contradicts an explicit flag
    is an error naming both. Returns the parsed JSON (``{}`` without ``--deepspeed_config``).
    """
    path = args.deepspeed_config
    if not path:
        return {}
    if not os.path.isfile(path):
        raise ArgumentError(f"--deepspeed_config {path}: no such file")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as exc:
        raise ArgumentError(f"--deepspeed_config {path}: not valid JSON ({exc})") from exc
    if not isinstance(cfg, dict):
        raise ArgumentError(f"--deepspeed_config {path}: must hold a JSON object")
    for section in ("optimizer", "scheduler"):
        if section in cfg:
            raise ArgumentError(
                f"--deepspeed_config {path}: remove its \"{section}\" section; the optimizer (AdamW) and the "
                f"learning-rate schedule come from --lr, --min-lr, --lr-decay-style, --weight-decay, "
                f"--adam-beta1/2, --adam-eps")
    explicit = args._explicit
    for path_keys, dest, flag in _JSON_FLAG_KEYS:
        value = _json_get(cfg, path_keys)
        if value is None or value == "auto":
            continue
        json_name = ".".join(path_keys)
        if dest in explicit:
            flag_value = getattr(args, dest)
            same = (bool(value) == bool(flag_value)) if isinstance(flag_value, bool) else \
                (float(value) == float(flag_value))
            if not same:
                raise ArgumentError(f"{flag} {flag_value} contradicts {json_name} = {value} in "
                                    f"--deepspeed_config {path}; give one of them")
        else:
            setattr(args, dest, bool(value) if dest in ("fp16", "bf16") else
                    (float(value) if dest == "clip_grad" else int(value)))
    fp16 = cfg.get("fp16") if isinstance(cfg.get("fp16"), dict) else {}
    if fp16.get("enabled"):
        if "loss_scale" in fp16 and "loss_scale" not in explicit:
            args.loss_scale = float(fp16["loss_scale"]) or None
        if "initial_scale_power" in fp16 and "initial_loss_scale" not in explicit:
            args.initial_loss_scale = 2.0 ** int(fp16["initial_scale_power"])
    return cfg


# --------------------------------------------------------------------------- validation


def resolve_fused_pattention_norm(flag: Optional[bool], cuda_available: bool, compiler_available: bool = True) -> bool:
    """``--fused-pattention-norm`` / ``--no-fused-pattention-norm`` as given, else on exactly when CUDA is
    available (compilation pays off on GPUs; on CPU it only adds start-up time) and torch.compile can build
    kernels there (``compiler_available``: Triton on CUDA, a C++ compiler on CPU). An explicit flag without
    a compiler is refused (it would fail at the first forward instead)."""
    if flag is None:
        return bool(cuda_available and compiler_available)
    _check(not flag or compiler_available,
           f"--fused-pattention-norm compiles kernels with torch.compile, which needs "
           f"{'Triton (the triton package)' if cuda_available else 'a C++ compiler (g++ or c++ on PATH)'} here; "
           f"install it or run with --no-fused-pattention-norm")
    return bool(flag)


def fused_norm_after_probe(explicit: bool, resolved: bool, device_type: str,
                           probe: Callable[[], Optional[str]]) -> Tuple[bool, Optional[str]]:
    """The fused Pattention kernels after trying to compile one (:func:`ops.pattention_norm.probe_fused_kernels`).

    Only on CUDA and only when they were going to be used: ``probe()`` returns None (works) or why not. A
    failure falls back to the plain kernels with one warning line (returned), or, when the user asked for
    them (``explicit``), is refused in one line: never a crash at the first forward. On CPU the compiler check
    of :func:`resolve_fused_pattention_norm` stands (a probe would add a compile to every start).
    Returns ``(use_fused, warning or None)``.
    """
    if not resolved or device_type != "cuda":
        return resolved, None
    error = probe()
    if error is None:
        return True, None
    _check(not explicit, f"--fused-pattention-norm: torch.compile cannot build a kernel on this GPU ({error}); "
                         f"Triton needs a C compiler and the Python headers; install them or run with "
                         f"--no-fused-pattention-norm")
    return False, (f"warning: the fused Pattention kernels cannot be compiled here ({error}); using the plain "
                   f"kernels (--no-fused-pattention-norm skips this check)")


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def _kernel_compiler_available(cuda_available: bool) -> bool:
    """What torch.compile's inductor needs to build kernels: Triton for CUDA, a C++ compiler for CPU."""
    import importlib.util
    import shutil
    if cuda_available:
        return importlib.util.find_spec("triton") is not None
    return any(shutil.which(name) for name in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++"))


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ArgumentError(message)


def _default_tokenizer_type(args) -> str:
    if args.tokenizer_type:
        return args.tokenizer_type
    if args.tokenizer_model:
        return "SentencePieceTokenizer"
    if args.vocab_file:
        return "HFTokenizer"
    return "NullTokenizer"


def _flag_name(field: str) -> str:
    """How an error of the model config's checks names a field on the command line: its flag
    (``ffn_hidden_size`` -> ``--ffn-hidden-size``, the tensor-parallel size -> ``--tensor-model-parallel-size``);
    a field without a flag keeps its name."""
    flag = FIELD_FLAGS.get(field)
    if flag is not None and flag.dest == field or field in _NAMED_BY_FLAG:
        return "--" + field.replace("_", "-")
    return field


#: fields (and sizes) a config message names by a flag other than a generated one
_NAMED_BY_FLAG = ("vocab_size", "tensor_model_parallel_size", "pipeline_model_parallel_size")


def _check_model_config(args: argparse.Namespace) -> None:
    """The model config these flags describe, checked by its one rule set (``ModelConfig.validate``);
    the error names the flags."""
    core_config_from_args(args, args.vocab_size or 1)


def validate_args(args: argparse.Namespace, world_size: int) -> argparse.Namespace:
    """Check the flag combination against ``world_size``; fill derived values. Raises ArgumentError.

    Derived: ``data_parallel_size``, ``gradient_accumulation_steps``, ``global_batch_size`` (if not
    given), ``max_position_embeddings``, the Pattention token counts, ``lr_warmup_iters``,
    ``lr_decay_iters``, ``tokenizer_type``, ``deepspeed_json`` (the user's JSON, reconciled).
    """
    _check(world_size >= 1, f"world size must be >= 1, got {world_size}")
    args.world_size = world_size
    args.deepspeed_json = load_deepspeed_json(args)

    # ---- required flags
    for dest, flag in (("num_layers", "--num-layers"), ("hidden_size", "--hidden-size"),
                       ("num_attention_heads", "--num-attention-heads"), ("seq_length", "--seq-length"),
                       ("micro_batch_size", "--micro-batch-size"), ("train_iters", "--train-iters"),
                       ("lr", "--lr")):
        _check(getattr(args, dest) is not None, f"{flag} is required")

    # ---- layout
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    cp = args.context_parallel_size
    _check(world_size % (tp * pp) == 0,
           f"--tensor-model-parallel-size ({tp}) x --pipeline-model-parallel-size ({pp}) = {tp * pp} "
           f"does not divide the world size ({world_size} ranks)")
    _check(world_size % (tp * pp * cp) == 0,
           f"--context-parallel-size ({cp}) x --tensor-model-parallel-size ({tp}) x --pipeline-model-parallel-size "
           f"({pp}) = {tp * pp * cp} does not divide the world size ({world_size} ranks)")
    dp = world_size // (tp * pp * cp)
    args.data_parallel_size = dp
    _check(args.zero_stage in (1, 2), f"--zero-stage {args.zero_stage}: only ZeRO stages 1 and 2 are supported "
                                      f"(DeepSpeed 0.19's non-ZeRO path does not count pipeline-parallel "
                                      f"gradients correctly in the clipping norm)")
    _check(not (args.zero_stage == 2 and pp > 1),
           f"--zero-stage 2 shards gradients, which DeepSpeed's pipeline engine does not support: use "
           f"--zero-stage 1 with --pipeline-model-parallel-size {pp}, or --pipeline-model-parallel-size 1")

    # ---- batch sizes
    mbs = args.micro_batch_size
    if args.global_batch_size is None:
        args.global_batch_size = mbs * dp
    gbs = args.global_batch_size
    _check(gbs % (mbs * dp) == 0,
           f"--global-batch-size ({gbs}) must be a multiple of --micro-batch-size ({mbs}) x data-parallel size "
           f"({dp} = {world_size} ranks / (TP {tp} x PP {pp}{f' x CP {cp}' if cp > 1 else ''})) = {mbs * dp}")
    args.gradient_accumulation_steps = gbs // (mbs * dp)
    ga_json = args.deepspeed_json.get("gradient_accumulation_steps")
    if ga_json not in (None, "auto"):
        _check(int(ga_json) == args.gradient_accumulation_steps,
               f"gradient_accumulation_steps = {ga_json} in --deepspeed_config {args.deepspeed_config} does not "
               f"match --global-batch-size {gbs} / (--micro-batch-size {mbs} x data-parallel {dp}) = "
               f"{args.gradient_accumulation_steps}")

    # ---- architecture: defaults for the flags not given, then the model config's own checks
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.qkv_num_param_tokens is None:
        args.qkv_num_param_tokens = args.hidden_size
    if args.proj_num_param_tokens is None:
        args.proj_num_param_tokens = args.hidden_size
    if args.ffn_num_param_tokens is None:
        args.ffn_num_param_tokens = 4 * args.hidden_size
    family = MODEL_FAMILY_FIELDS[args.model_type]
    users = [name for name, fields in MODEL_FAMILY_FIELDS.items() if "ffn_hidden_size" in fields.uses]
    _check(args.ffn_hidden_size is None or "ffn_hidden_size" in family.uses,
           f"--ffn-hidden-size applies to --model-type {'/'.join(users)} only (the {args.model_type} model does "
           f"not use it; a Tokenformer's FFN width is --ffn-num-param-tokens)")
    for dest in family.default_4h:
        if getattr(args, dest) is None:
            setattr(args, dest, 4 * args.hidden_size)
    # ---- activation memory: recomputation, sequence parallelism (CLI spellings and defaults here; the
    # model config checks the combinations itself)
    if args.checkpoint_activations:
        _check(args.recompute_granularity in (None, "full"), "--checkpoint-activations means --recompute-granularity "
                                                             "full; it cannot be combined with selective")
        args.recompute_granularity = "full"
    if args.recompute_granularity == "full":
        args.checkpoint_activations = True
        args.recompute_method = args.recompute_method or "uniform"
        args.recompute_num_layers = args.recompute_num_layers or 1
        if args.recompute_method == "block":
            _check(args.recompute_num_layers <= args.num_layers // pp,
                   f"--recompute-num-layers ({args.recompute_num_layers}) exceeds the {args.num_layers // pp} "
                   f"blocks of a pipeline stage (--recompute-method block)")
    if tp == 1:
        args.sequence_parallel = False  # nothing to split (as Megatron)
    if cp > 1:  # the load-balanced causal split: 2 x CP chunks, each split again over TP with sequence parallelism
        multiple = 2 * cp * (tp if args.sequence_parallel else 1)
        _check(args.seq_length % multiple == 0,
               f"--seq-length ({args.seq_length}) must be a multiple of 2 x --context-parallel-size ({cp})"
               + (f" x --tensor-model-parallel-size ({tp}) (--sequence-parallel)" if args.sequence_parallel else "")
               + f" = {multiple}")
    cuda = _cuda_available()
    args._fused_pattention_norm_explicit = args.fused_pattention_norm is not None  # (for fused_norm_after_probe)
    args.fused_pattention_norm = resolve_fused_pattention_norm(args.fused_pattention_norm, cuda,
                                                               _kernel_compiler_available(cuda))
    _check_model_config(args)

    # ---- precision
    _check(not (args.fp16 and args.bf16), "--fp16 and --bf16 are mutually exclusive")
    if args.fp16 and args.loss_scale is None:
        power = math.log2(args.initial_loss_scale) if args.initial_loss_scale > 0 else -1
        _check(args.initial_loss_scale > 0 and power == int(power),
               f"--initial-loss-scale ({args.initial_loss_scale}) must be a power of two")
    _check(args.loss_scale is None or args.loss_scale > 0, f"--loss-scale must be > 0, got {args.loss_scale}")

    # ---- optimizer / schedule
    _check(args.lr > 0, f"--lr must be > 0, got {args.lr}")
    _check(not (args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler),
           "--override-opt-param-scheduler and --use-checkpoint-opt-param-scheduler exclude each other: give one")
    _check(0 <= args.min_lr <= args.lr, f"--min-lr ({args.min_lr}) must lie in [0, --lr ({args.lr})]")
    _check(args.clip_grad >= 0, f"--clip-grad must be >= 0, got {args.clip_grad}")
    _check(args.weight_decay >= 0, f"--weight-decay must be >= 0, got {args.weight_decay}")
    _check(0 <= args.adam_beta1 < 1 and 0 <= args.adam_beta2 < 1,
           f"--adam-beta1/--adam-beta2 must lie in [0, 1), got {args.adam_beta1}, {args.adam_beta2}")
    _check(args.adam_eps > 0, f"--adam-eps must be > 0, got {args.adam_eps}")
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    _check(not (args.lr_warmup_iters is not None and args.lr_warmup_fraction is not None),
           "give --lr-warmup-iters or --lr-warmup-fraction, not both")
    if args.lr_warmup_fraction is not None:
        _check(0 <= args.lr_warmup_fraction <= 1,
               f"--lr-warmup-fraction must lie in [0, 1], got {args.lr_warmup_fraction}")
        args.lr_warmup_iters = int(args.lr_warmup_fraction * args.lr_decay_iters)
    elif args.lr_warmup_iters is None:
        args.lr_warmup_iters = 0
    _check(args.lr_warmup_iters <= args.lr_decay_iters,
           f"--lr-warmup-iters ({args.lr_warmup_iters}) exceeds --lr-decay-iters ({args.lr_decay_iters})")

    # ---- data
    _check(not (args.mock_data and args.data_path),
           "--mock-data and --data-path are mutually exclusive")
    _check(args.mock_data or bool(args.data_path), "give --data-path (or --mock-data for synthetic tokens)")
    args.tokenizer_type = _default_tokenizer_type(args)
    if args.tokenizer_type == "SentencePieceTokenizer":
        _check(args.tokenizer_model is not None, "--tokenizer-type SentencePieceTokenizer needs --tokenizer-model")
        _check(os.path.isfile(args.tokenizer_model), f"--tokenizer-model {args.tokenizer_model}: no such file")
    elif args.tokenizer_type in ("HFTokenizer", "HuggingFaceTokenizer"):
        # one tokenizer.json from --vocab-file / --tokenizer-model (file or folder): checkpoints copy it
        from megatron_tokenformer.data.hf_tokenizer import resolve_hf_tokenizer_file
        try:
            args.tokenizer_model = resolve_hf_tokenizer_file(args.tokenizer_type, args.tokenizer_model,
                                                             args.vocab_file)
        except ValueError as exc:
            raise ArgumentError(str(exc)) from None
    else:
        _check(args.vocab_size is not None, "--tokenizer-type NullTokenizer (and --mock-data without a "
                                            "tokenizer model) needs --vocab-size")
    if args.data_path:
        try:  # the data layer's parsers: the same rules the dataset builder applies
            prefixes, _ = parse_data_prefix(args.data_path)
            fractions = parse_split(args.split)
        except ValueError as exc:
            raise ArgumentError(str(exc)) from None
        for prefix in prefixes:
            for ext in (".bin", ".idx"):
                _check(os.path.isfile(prefix + ext),
                       f"--data-path {prefix}: {prefix + ext} not found (expected the .bin/.idx pair written "
                       f"by tools/preprocess_data.py)")
        _check(fractions[0] > 0, f"--split {args.split!r}: the train part is zero (pretraining needs training data)")

    # ---- checkpointing / logging
    _check(args.save_interval is None or args.save is not None, "--save-interval needs --save")
    _check(args.exit_duration_in_mins is None or args.exit_duration_in_mins > 0,
           f"--exit-duration-in-mins must be > 0, got {args.exit_duration_in_mins}")
    _check(args.peak_tflops is None or args.peak_tflops > 0, f"--peak-tflops must be > 0, got {args.peak_tflops}")
    return args


def core_config_from_args(args: argparse.Namespace, vocab_size: int, checkpoint=None) -> ModelConfig:
    """The :class:`~megatron_tokenformer.config.ModelConfig` these (validated) flags describe: every field with
    a flag (config.FIELD_FLAGS) from it (a flag left at None: the field's default), the family's recommended
    values, then the fields the checkpoint fixes. Raises ArgumentError naming the flags.

    ``checkpoint``: the :class:`~megatron_tokenformer.checkpoint_args.CheckpointArgs` the flags were
    reconciled with (:func:`~megatron_tokenformer.checkpoint_args.apply_checkpoint_args`): the config
    fields it fixes and no flag sets (tau) are taken from it.
    """
    kwargs = {field: vars(args)[flag.dest] for field, flag in FIELD_FLAGS.items()
              if vars(args)[flag.dest] is not None or field in _REQUIRED_FIELDS}
    kwargs["vocab_size"] = vocab_size
    kwargs.update(MODEL_FAMILY_FIELDS[args.model_type].recommended)  # the baseline GPT: parametric LayerNorms
    if checkpoint is not None:  # values the checkpoint fixed (e.g. tau after growth) win over the defaults
        kwargs.update(checkpoint.config_overrides())
    config = ModelConfig(**kwargs)
    config.resolve_taus()
    try:
        config.validate(args.tensor_model_parallel_size, args.pipeline_model_parallel_size, name=_flag_name)
    except ValueError as exc:
        raise ArgumentError(str(exc)) from exc
    return config


_REQUIRED_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.default is dataclasses.MISSING)


def options_from_args(record: Type[R], args: argparse.Namespace) -> R:
    """The typed options record ``record`` (a dataclass) the code below the entry point receives instead of the
    namespace: each field from the (validated) flag or derived value of the same name."""
    return record(**{f.name: vars(args)[f.name] for f in dataclasses.fields(record)})


def engine_options(args: argparse.Namespace) -> "EngineOptions":
    """:class:`~megatron_tokenformer.training.engine.EngineOptions` of these validated flags (the frozen
    parameter-token rows as the entry point resolved them, under ``param_token_freezing.ARG_KEY``)."""
    from megatron_tokenformer.training.engine import DeepSpeedOptions, EngineOptions, OptimizerOptions
    from megatron_tokenformer.training.param_token_freezing import ARG_KEY
    return EngineOptions(seed=args.seed, optimizer=options_from_args(OptimizerOptions, args),
                         deepspeed=options_from_args(DeepSpeedOptions, args),
                         frozen_param_tokens=vars(args).get(ARG_KEY))


def checkpoint_options(args: argparse.Namespace) -> "CheckpointOptions":
    """:class:`~megatron_tokenformer.checkpointing.options.CheckpointOptions` of these validated flags; its
    ``run_args`` (what every step records) is a copy of the namespace as it is now."""
    from megatron_tokenformer.checkpointing.options import CheckpointOptions
    fields = [f.name for f in dataclasses.fields(CheckpointOptions) if f.name != "run_args"]
    return CheckpointOptions(**{name: vars(args)[name] for name in fields}, run_args=dict(vars(args)))


def describe(args: argparse.Namespace, keys: Optional[Iterable[str]] = None) -> str:
    """Megatron-style ``------ arguments ------`` block (sorted ``name ..... value`` lines)."""
    items = sorted((k, v) for k, v in vars(args).items() if not k.startswith("_") and k != "deepspeed_json"
                   and (keys is None or k in keys))
    lines = ["------------------------ arguments ------------------------"]
    for key, value in items:
        lines.append(f"  {key} {'.' * max(2, 48 - len(key))} {value}")
    lines.append("-------------------- end of arguments ---------------------")
    return "\n".join(lines)
