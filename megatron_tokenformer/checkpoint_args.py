"""Reconciling the flags with the checkpoint ``--load`` resumes from (part of the arguments layer).

Called after parsing and before validation (:func:`apply_checkpoint_args`): architecture flags the
user did not pass take the checkpoint's values (with ``--use-checkpoint-args``, the default);
explicit flags that contradict the checkpoint are refused with every differing field listed. The
checkpoint's model config is returned, and :func:`~megatron_tokenformer.arguments.core_config_from_args`
takes from it what no flag sets (tau: growth keeps tau while the token count changes), so tau
reaches the model config through the config, never through ``args``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

from megatron_tokenformer.checkpointing.format.entries import CheckpointMismatchError
from megatron_tokenformer.checkpointing.format.files import resolve_step_dir
from megatron_tokenformer.checkpointing.format.metadata import read_meta

__all__ = ["CheckpointArgs", "apply_checkpoint_args", "CheckpointMismatchError", "ARCHITECTURE_FIELDS",
           "SOFT_FIELDS", "CHECKPOINT_ONLY_FIELDS"]

# args dest -> TokenformerConfig field. Shapes and the computed function depend on all of them.
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
    TokenformerConfig fields)."""

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
    load = getattr(args, "load", None)
    if not load:
        return None
    step_dir = resolve_step_dir(load)
    if step_dir is None:
        return None
    cfg = read_meta(step_dir).get("model_config", {})
    explicit = set(getattr(args, "_explicit", set()))
    use_ckpt = getattr(args, "use_checkpoint_args", True)
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
        if name in explicit and cfg.get(name) is not None and getattr(args, name, None) is not None \
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
