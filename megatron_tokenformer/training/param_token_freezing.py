"""``--train-only-new-param-tokens``: after a growth, train only the parameter tokens it added.

The paper's closing claim (arXiv 2410.23168, §5): a grown Tokenformer can be tuned by training only the
new key/value parameter tokens. With the flag, on every rank:

- the tensors that hold no new row (embedding, every LayerNorm but the final one, the Transformer's
  linear layers) get ``requires_grad = False`` before the optimizer is built: no gradient, no
  optimizer state, no weight decay;
- each Pattention's key and value tokens [n_local, d] keep their ``n_old`` first global rows (the
  growth appended its rows after them, :mod:`megatron_tokenformer.checkpointing.grow`): a gradient hook
  zeroes those rows' gradient (so they do not count in the clipped norm either), their Adam moments are
  set to zero once at the start, and after every optimizer step the old rows of the module parameter
  AND of DeepSpeed's fp32 master partition are written back from a copy taken at the start, which
  undoes the decoupled weight decay: the old rows stay bitwise what the checkpoint held;
- the final LayerNorm is trained (the paper tunes it with the new tokens).

Which rows are old: the ``n_old`` counts of the LAST growth, read from the grown checkpoint's
expansion report; a run with the flag records them in its arguments (``train_only_new_param_tokens_from``,
saved in every checkpoint's meta), so a resume -- and a resharded copy, whose meta keeps the arguments --
keeps training the same rows even without the flag; ``--no-train-only-new-param-tokens`` trains all.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from megatron_tokenformer.deepspeed_boundary import base_optimizer, zero_fragment
from megatron_tokenformer.errors import TokenformerError

__all__ = ["ARG_KEY", "FreezingOptions", "resolve_frozen_counts", "ParamTokenFreezer", "setup_param_token_freezing"]

ARG_KEY = "train_only_new_param_tokens_from"
_FIELDS = ("qkv_num_param_tokens", "proj_num_param_tokens", "ffn_num_param_tokens")
_KIND_FIELD = {"qkv": "qkv_num_param_tokens", "proj": "proj_num_param_tokens", "ffn": "ffn_num_param_tokens"}


class FreezingError(TokenformerError, ValueError):
    """--train-only-new-param-tokens cannot be applied (message names the flag and the checkpoint)."""


@dataclass(frozen=True)
class FreezingOptions:
    """The flags :func:`resolve_frozen_counts` reads (``--train-only-new-param-tokens``, ``--load``, the model's
    family and token counts, after the checkpoint filled them in)."""

    train_only_new_param_tokens: Optional[bool]
    load: Optional[str]
    model_type: str
    qkv_num_param_tokens: int
    proj_num_param_tokens: int
    ffn_num_param_tokens: int


def resolve_frozen_counts(options: FreezingOptions, step_dir: Optional[str] = None) -> Optional[Dict[str, int]]:
    """The old token counts per kind (``{"qkv_num_param_tokens": n_old, ...}``) this run keeps frozen, or None.

    ``options.train_only_new_param_tokens``: True (the flag), False (``--no-...``: train all) or None (not
    given). With the flag: the loaded checkpoint's expansion report when it records a token growth (the
    last growth), else its saved arguments (a run that already froze). Without it: the saved arguments
    only (a resume keeps freezing), and nothing from a freshly grown checkpoint.
    ``step_dir``: the step folder ``--load`` resumes from (None: none).
    """
    from megatron_tokenformer.checkpointing.format import files, metadata

    wanted = options.train_only_new_param_tokens
    if wanted is False:
        return None
    growth = saved = None
    if step_dir is not None:
        report_path = os.path.join(step_dir, files.REPORT_FILE)
        if os.path.isfile(report_path):
            with open(report_path) as f:
                changes = (json.load(f).get("growth") or {}).get("token_counts") or {}
            if changes:
                growth = {field: int(changes[field]["old"]) if field in changes else None for field in _FIELDS}
        recorded = (metadata.read_meta(step_dir).get("args") or {}).get(ARG_KEY)
        if recorded:
            saved = {field: (int(recorded[field]) if recorded.get(field) is not None else None) for field in _FIELDS}
    # the flag: the last growth's old rows (or the record of a run that already froze); no flag: only the
    # record, and not across a new growth (which starts a new choice)
    counts = (growth or saved) if wanted else (saved if growth is None else None)
    if counts is None:
        if wanted:
            where = f"--load {options.load} ({step_dir})" if step_dir else "no --load checkpoint"
            raise FreezingError(f"--train-only-new-param-tokens needs a checkpoint grown by tools/expand_checkpoint.py "
                                f"(--param-token-growth-factor or --*-num-param-tokens) or saved by a run with this "
                                f"flag; {where} records no token growth")
        return None
    if options.model_type != "tokenformer":
        raise FreezingError("--train-only-new-param-tokens applies to --model-type tokenformer only")
    # a kind the growth did not change keeps all its rows frozen: n_old = n
    for field in _FIELDS:
        n = int(getattr(options, field))
        if counts[field] is None:
            counts[field] = n
        if not 0 <= counts[field] <= n:
            raise FreezingError(f"--train-only-new-param-tokens: the checkpoint records {counts[field]} old tokens for "
                                f"{field} but the model has {n}")
    return counts


def _local_old_rows(n_old: int, n_global: int, rank: int, world: int) -> int:
    """How many of this rank's rows (its block of n_global / world consecutive rows) are among the first n_old."""
    per = n_global // world
    return max(0, min(n_old - rank * per, per))


class ParamTokenFreezer:
    """Holds the frozen rows of one rank's model; :meth:`start` once before the first step, then
    :meth:`after_step` after each optimizer step."""

    def __init__(self, model: torch.nn.Module, counts: Dict[str, int], tp_rank: int, tp_size: int):
        from megatron_tokenformer.checkpointing.grow import pattention_kind
        from megatron_tokenformer.model.naming import canonical_parameter_names

        self.counts = dict(counts)
        names = canonical_parameter_names(model)
        self.partial: List[Tuple[str, torch.nn.Parameter, int]] = []  # (name, param, local old rows)
        self.trainable_numel = 0
        self.total_numel = 0
        for local_name, param in model.named_parameters():
            cname = names[local_name]
            self.total_numel += param.numel()
            pk = pattention_kind(cname)
            if pk is not None:
                n_global = param.shape[0] * (tp_size if getattr(param, "tensor_model_parallel", False) else 1)
                world = tp_size if getattr(param, "tensor_model_parallel", False) else 1
                rank = tp_rank if world > 1 else 0
                old = _local_old_rows(self.counts[_KIND_FIELD[pk[0]]], n_global, rank, world)
                if old >= param.shape[0]:
                    param.requires_grad_(False)  # this rank holds only old rows of it
                    continue
                self.trainable_numel += (param.shape[0] - old) * param[0].numel()
                if old > 0:
                    self.partial.append((cname, param, old))
                    mask = torch.ones(param.shape[0], *([1] * (param.ndim - 1)), dtype=param.dtype,
                                      device=param.device)
                    mask[:old] = 0
                    param.register_hook(lambda grad, mask=mask: grad * mask.to(grad.dtype))
            elif cname.startswith("final_layernorm."):
                self.trainable_numel += param.numel()
            else:
                param.requires_grad_(False)
        self._saved: List[torch.Tensor] = []
        self.started = False

    def start(self, engine) -> None:
        """Copy the old rows (after the checkpoint is loaded) and zero their Adam moments."""
        self._base = base_optimizer(engine.optimizer)
        self._saved = [param.detach()[:old].clone() for _, param, old in self.partial]
        for _, param, old in self.partial:
            for key in ("exp_avg", "exp_avg_sq"):
                fragment, count = self._old_part(param, old, key)
                if fragment is not None:
                    fragment[:count].zero_()
        self.started = True

    def _old_part(self, param, old: int, key: Optional[str]):
        """(this rank's fp32 fragment of ``param`` -- the master weights for key None, else the optimizer
        state ``key`` --, how many of its first elements are old rows); (None, 0) when it holds none.

        ZeRO-1/2 keep each parameter's fp32 master and Adam moments as a contiguous fragment of a flat
        partition: the elements [lo, lo + n) of the flattened parameter (:func:`zero_fragment`). Old rows are
        the flat elements [0, old x row size), so the fragment's old part is its first max(0, min(n, end - lo))."""
        fragment = zero_fragment(param)
        if fragment is None:
            return None, 0
        count = max(0, min(fragment.numel, old * param[0].numel() - fragment.start))
        if count == 0:
            return None, 0
        if key is None:
            return fragment.master, count
        state = fragment.optimizer_state(self._base, key)
        if state is None:
            return None, 0  # no state yet (a fresh optimizer): it starts at zero and the gradient is zero
        return state, count

    @torch.no_grad()
    def after_step(self) -> None:
        """Write the old rows back into the module parameters and DeepSpeed's fp32 master fragments."""
        for (_, param, old), saved in zip(self.partial, self._saved):
            param.data[:old].copy_(saved.to(param.dtype))
            master, count = self._old_part(param, old, None)
            if master is not None:
                lo = zero_fragment(param).start
                master[:count].copy_(saved.reshape(-1)[lo:lo + count].to(master.dtype))


def setup_param_token_freezing(counts: Optional[Dict[str, int]], model: torch.nn.Module) -> Optional[ParamTokenFreezer]:
    """Before the optimizer is built: freeze the old rows ``counts`` (:func:`resolve_frozen_counts`; the entry
    point records them in the arguments under :data:`ARG_KEY`, so checkpoints keep them) of ``model``; None when
    the run trains everything (``counts`` None)."""
    from megatron_tokenformer import parallel_state

    if counts is None:
        return None
    from megatron_tokenformer.training.logging import print_rank_0
    freezer = ParamTokenFreezer(model, counts, parallel_state.get_tensor_model_parallel_rank(),
                                parallel_state.get_tensor_model_parallel_world_size())
    print_rank_0(f"> --train-only-new-param-tokens: {freezer.trainable_numel:,} of {freezer.total_numel:,} parameters "
                 f"trained on rank 0 (old token counts {counts})")
    return freezer
