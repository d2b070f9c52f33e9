"""Reconciling the flags with the checkpoint ``--load`` resumes from (part of the arguments layer).

Called after parsing and before validation (:func:`apply_checkpoint_args`): architecture flags the
user did not pass take the checkpoint's values (with ``--use-checkpoint-args``, the default);
explicit flags that contradict the checkpoint are refused with every differing field listed. The
checkpoint's model config is returned, and :func:`~megatron_tokenformer.arguments.core_config_from_args`
takes from it what no flag sets (tau: growth keeps tau while the token count changes), so tau
reaches the model config through the config, never through ``args``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from megatron_tokenformer.checkpointing.format.entries import CheckpointMismatchError
from megatron_tokenformer.checkpointing.format.files import TOKENIZER_FILE, resolve_step_dir
from megatron_tokenformer.checkpointing.format.metadata import read_meta

__all__ = ["CheckpointArgs", "ResumeInputs", "apply_checkpoint_args", "CheckpointMismatchError", "ARCHITECTURE_FIELDS",
           "SOFT_FIELDS", "CHECKPOINT_ONLY_FIELDS", "check_resume_inputs", "file_digest"]

# args dest -> ModelConfig field. Shapes and the computed function depend on all of them.
ARCHITECTURE_FIELDS = {
    "num_layers": "num_layers",
    "hidden_size": "hidden_size",
    "num_attention_heads": "num_attention_heads",
    "qkv_num_param_tokens": "qkv_num_param_tokens",
    "proj_num_param_tokens": "proj_num_param_tokens",
    "ffn_num_param_tokens": "ffn_num_param_tokens",
    "pattention_normalization": "pattention_normalization",
    "rotary_percent": "rotary_percent",
    "make_vocab_size_divisible_by": "make_vocab_size_divisible_by",
    "model_type": "model_type",
    "ffn_hidden_size": "ffn_hidden_size",  # the baseline transformer's MLP width
}
# Filled in from the checkpoint when not given, but may be changed on purpose (no parameter depends
# on them: rotary positions, init only).
SOFT_FIELDS = {"seq_length": "seq_length", "max_position_embeddings": "max_position_embeddings",
               "init_method_std": "init_method_std"}
# Config fields the checkpoint always fixes (core_config_from_args takes them from here); an explicit
# --*-tau must agree with the checkpoint's.
CHECKPOINT_ONLY_FIELDS = ("qkv_tau", "proj_tau", "ffn_tau")


@dataclass
class CheckpointArgs:
    """The checkpoint the flags were reconciled with: its step folder and model config (a dict of
    ModelConfig fields)."""

    step_dir: str
    model_config: Dict[str, Any]

    def config_overrides(self) -> Dict[str, float]:
        """The config fields the checkpoint fixes and no flag sets (tau), for core_config_from_args."""
        return {name: float(self.model_config[name]) for name in CHECKPOINT_ONLY_FIELDS
                if self.model_config.get(name) is not None}


def apply_checkpoint_args(args) -> Optional[CheckpointArgs]:
    """Fill architecture flags from the checkpoint ``args.load`` resumes from (module docstring).

    Returns the checkpoint (None without ``--load`` or when nothing is saved there yet). Raises
    :class:`CheckpointMismatchError` listing every explicit flag that contradicts the checkpoint.
    """
    load = args.load
    if not load:
        return None
    step_dir = resolve_step_dir(load)
    if step_dir is None:
        return None
    cfg = read_meta(step_dir).get("model_config", {})
    explicit = set(args._explicit)
    use_ckpt = args.use_checkpoint_args
    mismatches = []
    for dest, field in ARCHITECTURE_FIELDS.items():
        if field not in cfg or not hasattr(args, dest):
            continue
        value = cfg[field]
        if dest in explicit:
            if getattr(args, dest) != value:
                mismatches.append(f"--{dest.replace('_', '-')} {getattr(args, dest)} (checkpoint: {value})")
        elif use_ckpt:
            setattr(args, dest, value)
    for dest, field in SOFT_FIELDS.items():
        if field in cfg and hasattr(args, dest) and dest not in explicit and use_ckpt:
            setattr(args, dest, cfg[field])
    # The vocabulary comes from the tokenizer (NullTokenizer adds an end-of-document id to --vocab-size);
    # load_checkpoint compares the built model's vocab_size with the checkpoint's.
    for name in CHECKPOINT_ONLY_FIELDS:  # an explicit --*-tau must agree with the checkpoint's (which always wins)
        if name in explicit and cfg.get(name) is not None and getattr(args, name) is not None \
                and abs(float(getattr(args, name)) - float(cfg[name])) > 1e-12 * max(1.0, abs(float(cfg[name]))):
            mismatches.append(f"--{name.replace('_', '-')} {getattr(args, name)} (checkpoint: {cfg[name]})")
    if mismatches:
        raise CheckpointMismatchError(
            f"the checkpoint {step_dir} does not match the model the flags describe; differing: "
            + "; ".join(mismatches)
            + ". Drop these flags to use the checkpoint's values, or convert the checkpoint with "
              "tools/expand_checkpoint.py (growth: --qkv-num-param-tokens/--proj-num-param-tokens/"
              "--ffn-num-param-tokens/--num-layers).")
    return CheckpointArgs(step_dir, dict(cfg))


# --------------------------------------------------------------------------- what the run feeds the model
def file_digest(path: str) -> str:
    """sha256 of a file's content (tokenizer files: a few MB at most)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _data_plan(data_path: Optional[List[str]]) -> Optional[tuple]:
    """(prefixes resolved, weights or None) of a ``--data-path``, or None for mock data / none."""
    from megatron_tokenformer.data.blending import parse_data_prefix
    if not data_path:
        return None
    try:
        prefixes, weights = parse_data_prefix(data_path)
    except ValueError:
        return ("unparsable", tuple(map(str, data_path)))
    resolved = tuple(os.path.realpath(os.path.abspath(p)) for p in prefixes)
    if len(resolved) == 1:
        return resolved, None
    return resolved, None if weights is None else tuple(round(float(w), 9) for w in weights)


def _split(text) -> Optional[tuple]:
    from megatron_tokenformer.data.gpt_dataset import parse_split
    try:
        return tuple(round(f, 9) for f in parse_split(text))
    except (ValueError, TypeError):
        return None


@dataclass(frozen=True)
class ResumeInputs:
    """The flags :func:`check_resume_inputs` compares with the checkpoint: the tokenizer and the data."""

    tokenizer_type: Optional[str]
    tokenizer_model: Optional[str]
    vocab_file: Optional[str]
    data_path: Optional[List[str]]
    split: str
    finetune: bool = False
    override_checkpoint_tokenizer: bool = False
    override_checkpoint_split: bool = False


def check_resume_inputs(args: ResumeInputs, checkpoint: Optional[CheckpointArgs]) -> List[str]:
    """What the resumed run feeds the model, against what the checkpoint was trained on.

    * **Tokenizer** (also with ``--finetune``): the checkpoint's copy (``tokenizer.model`` in the step)
      and the run's ``--tokenizer-model`` / ``--vocab-file`` are compared by content (sha256). Another
      tokenizer (same vocabulary size or not: the embedding rows belong to the old ids, and the next
      step would ship the new file) is refused unless ``--override-checkpoint-tokenizer``.
    * **Data** (a resume, not ``--finetune``, after at least one consumed sample): another
      ``--data-path`` (other files or weights; compared after resolving paths) is a new corpus: one
      note line, the consumed-sample count continues as a position in the new data's order. The same
      ``--data-path`` with another ``--split`` is refused unless ``--override-checkpoint-split``: the
      documents of the validation and test ranges would move into training and the training
      documents would be re-shuffled (samples seen twice or never) -- the guarantees of docs/data.md.

    Returns the note lines; raises :class:`CheckpointMismatchError` (one line) on a refusal.
    """
    if checkpoint is None:
        return []
    notes: List[str] = []
    step_dir = checkpoint.step_dir
    meta = read_meta(step_dir)
    stored = os.path.join(step_dir, TOKENIZER_FILE)
    run_tok = args.tokenizer_model or args.vocab_file
    if os.path.isfile(stored):
        if run_tok and os.path.isfile(run_tok):
            if file_digest(run_tok) != file_digest(stored):
                if not args.override_checkpoint_tokenizer:
                    raise CheckpointMismatchError(
                        f"the tokenizer {run_tok} differs from the one {step_dir} was trained with ({stored}, "
                        f"from {meta.get('tokenizer', {}).get('source') or 'unknown'}): token ids would mean other "
                        "text and the next checkpoint would carry the new tokenizer; pass that file as "
                        "--tokenizer-model/--vocab-file, or --override-checkpoint-tokenizer to change it on purpose")
                notes.append(f"note: --override-checkpoint-tokenizer: training {step_dir} on the tokenizer {run_tok} "
                             "(another one than it was trained with)")
        else:
            notes.append(f"note: {step_dir} was trained with the tokenizer {stored}; this run uses none "
                         f"({args.tokenizer_type}), and its checkpoints will carry none")
    if args.finetune or int(meta.get("consumed_samples", 0) or 0) == 0:
        return notes
    consumed = int(meta["consumed_samples"])
    old_args = meta.get("args", {}) or {}
    old_plan, new_plan = _data_plan(old_args.get("data_path")), _data_plan(args.data_path)
    old_desc = " ".join(map(str, old_args.get("data_path") or [])) or "--mock-data"
    if old_plan != new_plan:
        new_desc = " ".join(map(str, args.data_path or [])) or "--mock-data"
        notes.append(f"note: --data-path {new_desc} is not the data {step_dir} was trained on ({old_desc}): its "
                     f"{consumed} consumed samples count as positions in the new data's order (the first {consumed} "
                     "samples of the new data are skipped, nothing of the old data is resumed)")
    elif new_plan is not None and _split(old_args.get("split")) is not None and \
            _split(old_args.get("split")) != _split(args.split):  # (an unknown split: no claim)
        if not args.override_checkpoint_split:
            raise CheckpointMismatchError(
                f"--split {args.split} differs from the split {step_dir} was trained with ({old_args.get('split')}) "
                f"on the same --data-path: validation and test documents would move into training and the "
                f"{consumed} consumed samples would no longer be the ones seen (see docs/data.md); pass --split "
                f"{old_args.get('split')}, or --override-checkpoint-split to change it on purpose")
        notes.append(f"note: --override-checkpoint-split: --split {args.split} instead of {old_args.get('split')} "
                     "on the same data; samples may be seen twice or never, held-out documents may be trained on")
    return notes

