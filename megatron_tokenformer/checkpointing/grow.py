"""Growing a checkpoint: more parameter tokens per Pattention, more layers (docs/design.md §5).

Token growth appends rows to a Pattention's key and value tokens [n, d] -> [n', d]:

- new KEY tokens are zero: their scores X Kᵀ are 0, they add nothing to the row norm ||A||, and
  GeLU(0) = 0, so ``l2_norm_gelu`` and ``gelu_l2_norm`` compute exactly what they computed before,
  whatever the new values are. tau is kept (the config stores it as a number).
- new VALUE tokens are N(0, new_value_std²), so the new keys get a gradient (GeLU'(0) = ½) and learn.
- ``softmax`` cannot grow without changing the function (exp(0) = 1 takes probability mass, and
  the n·softmax scale changes): refused.
- optimizer state: old rows keep their fp32 master and Adam moments, new rows start at zero
  moments; the step count is kept (or the whole optimizer state is dropped, ``reset_optimizer``).

Depth growth inserts new blocks whose output-projection and FFN VALUE tokens are zero: the block
adds ``dense(...) = 0`` and ``mlp(...) = 0`` to the residual stream, so it is the identity, and it
still trains (the zero values get gradients). Its other tensors get the model's own init (keys
N(0, init_method_std), Q/K/V values N(0, value std), LayerNorm ones/zeros).

Order of tokens does not matter to a Pattention, so growing under TP is: gather the full [n, d]
(:class:`~.format.view.CheckpointView` does), append, and re-split for the target TP.

:class:`GrownView` wraps a view with a :class:`GrowthPlan` and has the same read interface, one
parameter at a time.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from megatron_tokenformer.checkpointing.format.entries import FP32, ParamEntry
from megatron_tokenformer.checkpointing.format.source import Parts
from megatron_tokenformer.checkpointing.format.view import CheckpointView
from megatron_tokenformer.errors import TokenformerError
from megatron_tokenformer.model.spec import ModelSpec, TokenformerSpec, UnknownParameterError

__all__ = ["GrowthPlan", "GrownView", "plan_growth", "interleaved_positions", "GrowthError", "TOKEN_KINDS"]

# kind -> config field; the Pattentions of each kind
TOKEN_KINDS = TokenformerSpec.token_fields
_SPEC = TokenformerSpec()


class GrowthError(TokenformerError, ValueError):
    """The requested growth cannot be applied to this checkpoint (message names the flag)."""


def pattention_kind(name: str) -> Optional[Tuple[str, str]]:
    """(kind, 'key'|'value') for a canonical Pattention tensor name, else None (the Tokenformer spec's
    classification)."""
    try:
        info = _SPEC.classify(name)
    except UnknownParameterError:
        return None
    return (info.group, info.role) if info.group is not None else None


def interleaved_positions(old_layers: int, new_layers: int) -> List[int]:
    """Default positions (0-based, in the NEW model) of the inserted blocks: spread evenly, each after
    an old block. E.g. 2 -> 4: [1, 3] (old, new, old, new); 4 -> 6: [2, 5]."""
    k = new_layers - old_layers
    positions, pos = [], 0
    for j in range(old_layers):
        pos += 1  # old block j
        add = (j + 1) * k // old_layers - j * k // old_layers
        for _ in range(add):
            positions.append(pos)
            pos += 1
    return positions


@dataclass
class GrowthPlan:
    """What to grow. ``layer_sources[j]`` = old layer index of new layer j, or None for an inserted block."""

    old_config: object
    new_config: object
    layer_sources: List[Optional[int]]
    new_value_std: float
    seed: int
    reset_optimizer: bool = False
    token_changes: Dict[str, Tuple[int, int]] = field(default_factory=dict)

    @property
    def new_layer_positions(self) -> List[int]:
        return [j for j, s in enumerate(self.layer_sources) if s is None]

    @property
    def grows(self) -> bool:
        return bool(self.token_changes) or bool(self.new_layer_positions)


def plan_growth(config, qkv_num_param_tokens: Optional[int] = None, proj_num_param_tokens: Optional[int] = None,
                ffn_num_param_tokens: Optional[int] = None, param_token_growth_factor: Optional[float] = None,
                num_layers: Optional[int] = None, new_layer_positions: Optional[List[int]] = None,
                new_value_std: Optional[float] = None, seed: int = 1234,
                reset_optimizer: bool = False) -> GrowthPlan:
    """Validate a growth request against ``config`` (the source model config) and plan it."""
    old = copy.deepcopy(config).resolve_taus()
    new = copy.deepcopy(old)
    requested = {"qkv": qkv_num_param_tokens, "proj": proj_num_param_tokens, "ffn": ffn_num_param_tokens}
    if param_token_growth_factor is not None:
        if any(v is not None for v in requested.values()):
            raise GrowthError("--param-token-growth-factor cannot be combined with --qkv-num-param-tokens/"
                              "--proj-num-param-tokens/--ffn-num-param-tokens")
        if not param_token_growth_factor >= 1:
            raise GrowthError(f"--param-token-growth-factor must be >= 1, got {param_token_growth_factor}")
        for kind, fname in TOKEN_KINDS.items():
            value = getattr(old, fname) * param_token_growth_factor
            if abs(value - round(value)) > 1e-9:
                raise GrowthError(f"--param-token-growth-factor {param_token_growth_factor} gives a non-integer "
                                  f"token count for {fname} ({getattr(old, fname)} x {param_token_growth_factor})")
            requested[kind] = int(round(value))
    changes = {}
    for kind, fname in TOKEN_KINDS.items():
        value = requested[kind]
        if value is None or value == getattr(old, fname):
            continue
        flag = "--" + fname.replace("_", "-")
        if value < getattr(old, fname):
            raise GrowthError(f"{flag} {value} is smaller than the checkpoint's {getattr(old, fname)}: tokens can "
                              "only be added")
        changes[kind] = (getattr(old, fname), int(value))
        setattr(new, fname, int(value))
    if changes and old.pattention_normalization == "softmax":
        raise GrowthError("the checkpoint's Pattentions use softmax normalisation, which cannot gain parameter tokens "
                          "without changing the function (a zero key scores exp(0) = 1 and the n*softmax scale "
                          "changes); token growth is refused. Depth growth (--num-layers) is still exact.")
    old_layers = old.num_layers
    target_layers = old_layers if num_layers is None else int(num_layers)
    if target_layers < old_layers:
        raise GrowthError(f"--num-layers {target_layers} is smaller than the checkpoint's {old_layers}: layers can "
                          "only be added")
    added = target_layers - old_layers
    if new_layer_positions is not None:
        if added == 0:
            raise GrowthError("--new-layer-positions needs --num-layers larger than the checkpoint's "
                              f"{old_layers}")
        positions = [int(p) for p in new_layer_positions]
        if len(positions) != added or len(set(positions)) != added or \
                any(not 0 <= p < target_layers for p in positions):
            raise GrowthError(f"--new-layer-positions must list {added} distinct indices in [0, {target_layers}) "
                              f"(0-based positions of the new blocks in the grown model), got {positions}")
    else:
        positions = interleaved_positions(old_layers, target_layers) if added else []
    sources: List[Optional[int]] = []
    next_old = 0
    for j in range(target_layers):
        if j in positions:
            sources.append(None)
        else:
            sources.append(next_old)
            next_old += 1
    new.num_layers = target_layers
    std = old.value_init_std() if new_value_std is None else float(new_value_std)
    if not std >= 0 or math.isinf(std):
        raise GrowthError(f"--new-value-std must be a finite number >= 0, got {new_value_std}")
    return GrowthPlan(old, new, sources, std, int(seed), bool(reset_optimizer), changes)


class GrownView:
    """A :class:`CheckpointView` with a :class:`GrowthPlan` applied: a
    :class:`~.format.source.CheckpointSource`.

    ``params``: the grown model's entries (canonical names of the NEW model); ``read(name, key)``
    builds one full tensor from the source (old rows) and the growth rules (new rows / blocks).
    """

    def __init__(self, view: CheckpointView, plan: GrowthPlan):
        self.view = view
        self.plan = plan
        self.config = plan.new_config
        self.reset_optimizer = plan.reset_optimizer
        self.state_keys = [] if plan.reset_optimizer else list(view.state_keys)
        self.params: Dict[str, ParamEntry] = {}
        self._source: Dict[str, Optional[str]] = {}  # new name -> old name (None: a new block's tensor)
        default_step = self._default_steps()
        for name, entry in view.params.items():
            if ModelSpec.block_suffix(name) is None:
                self._add(name, name, entry)
        for j, src in enumerate(plan.layer_sources):
            old_index = src if src is not None else 0
            prefix_old = f"layers.{old_index}."
            for name, entry in view.params.items():
                if not name.startswith(prefix_old):
                    continue
                suffix = name[len(prefix_old):]
                new_name = f"layers.{j}.{suffix}"
                self._add(new_name, name if src is not None else None, entry,
                          default_step.get(suffix) if src is None else None)
        self.keys = [FP32] + self.state_keys

    def _default_steps(self) -> Dict[str, Optional[float]]:
        steps = {}
        for name, entry in self.view.params.items():
            block = ModelSpec.block_suffix(name)
            if block and block[1] not in steps:
                steps[block[1]] = entry.step
        return steps

    def _new_shape(self, name: str, entry: ParamEntry) -> Tuple[int, ...]:
        pk = pattention_kind(name)
        if pk is None:
            return tuple(entry.shape)
        fname = TOKEN_KINDS[pk[0]]
        return (getattr(self.plan.new_config, fname),) + tuple(entry.shape[1:])

    def _add(self, new_name, old_name, entry: ParamEntry, step=None):
        shape = self._new_shape(new_name, entry)
        new_step = None if self.plan.reset_optimizer else (entry.step if old_name is not None else step)
        self.params[new_name] = ParamEntry(new_name, shape, entry.dtype, entry.partition_dim, entry.vocab, new_step)
        self._source[new_name] = old_name

    def source_name(self, name: str) -> Optional[str]:
        return self._source[name]

    def describe(self, name: str) -> str:
        src = self._source[name]
        if src is None:
            return "new block (identity init)"
        old_shape = tuple(self.view.params[src].shape)
        new_shape = tuple(self.params[name].shape)
        if old_shape != new_shape:
            kind, kv = pattention_kind(name)
            return f"{src}: {old_shape[0]} -> {new_shape[0]} tokens ({'zero' if kv == 'key' else 'random'} new rows)"
        return src if src != name else "copied"

    def _generator(self, name: str, layer_number: int, tag: str) -> torch.Generator:
        from megatron_tokenformer.tensor_parallel.random import parameter_generator
        return parameter_generator(self.plan.seed, layer_number, f"growth/{tag}")

    def read(self, name: str, key: str = FP32) -> torch.Tensor:
        entry = self.params[name]
        src = self._source[name]
        if key != FP32 and key not in self.state_keys:
            raise KeyError(f"{name}: no optimizer state {key!r} (reset_optimizer={self.plan.reset_optimizer})")
        if src is None:
            return self._new_block_tensor(name, entry, key)
        old = self.view.read(src, key)
        if tuple(old.shape) == tuple(entry.shape):
            return old
        extra = entry.shape[0] - old.shape[0]
        out = torch.empty(entry.shape, dtype=torch.float32)
        out[:old.shape[0]].copy_(old)
        del old
        tail = out[entry.shape[0] - extra:]
        kind, kv = pattention_kind(name)
        if key == FP32 and kv == "value" and self.plan.new_value_std > 0:
            layer_number = ModelSpec.block_suffix(name)[0] + 1
            tail.normal_(0.0, self.plan.new_value_std, generator=self._generator(name, layer_number, name))
        else:
            tail.zero_()
        return out

    def plan_parts(self, name: str, key: str = FP32) -> Optional[Parts]:
        """How to write ``read(name, key)`` without building it: ``(copies, fills)`` for
        :meth:`~.format.canonical.CanonicalWriter.write_parts`, or None (then use :meth:`read`).

        Old rows are copied byte for byte from the source files; new random value rows are the
        fills; zero rows (new keys, new moments, identity blocks' values) are left as holes.
        """
        entry = self.params[name]
        src = self._source[name]
        if key != FP32 and key not in self.state_keys:
            raise KeyError(f"{name}: no optimizer state {key!r} (reset_optimizer={self.plan.reset_optimizer})")
        if src is None:
            tensor = self._new_block_tensor(name, entry, key)
            return ([], [] if not torch.count_nonzero(tensor) else [(0, tensor.view(-1))])
        old = self.view.params[src]
        copies = self.view.flat_sources(src, key, 0, old.numel())
        if copies is None:
            return None
        fills = []
        if tuple(old.shape) != tuple(entry.shape):
            kind, kv = pattention_kind(name)
            if key == FP32 and kv == "value" and self.plan.new_value_std > 0:
                extra = entry.shape[0] - old.shape[0]
                tail = torch.empty((extra,) + tuple(entry.shape[1:]), dtype=torch.float32)
                layer_number = ModelSpec.block_suffix(name)[0] + 1
                tail.normal_(0.0, self.plan.new_value_std, generator=self._generator(name, layer_number, name))
                fills.append((old.numel(), tail.view(-1)))
        return copies, fills

    def _new_block_tensor(self, name: str, entry: ParamEntry, key: str) -> torch.Tensor:
        if key != FP32:
            return torch.zeros(entry.shape, dtype=torch.float32)
        layer, suffix = ModelSpec.block_suffix(name)
        layer_number = layer + 1
        pk = pattention_kind(name)
        cfg = self.plan.new_config
        if pk is not None:
            kind, kv = pk
            if kv == "key":
                std = cfg.init_method_std
            elif kind in ("proj", "ffn"):
                return torch.zeros(entry.shape, dtype=torch.float32)  # identity: zero output values
            else:
                std = self.plan.new_value_std
            from megatron_tokenformer.tensor_parallel.random import master_normal
            return master_normal(entry.shape, std, self.plan.seed, layer_number, suffix)
        if suffix.endswith("layernorm.weight"):
            return torch.ones(entry.shape, dtype=torch.float32)
        if suffix.endswith("layernorm.bias"):
            return torch.zeros(entry.shape, dtype=torch.float32)
        raise GrowthError(f"do not know how to initialise {name} of an inserted block")

    def report(self) -> Dict[str, object]:
        plan = self.plan
        return {
            "token_counts": {TOKEN_KINDS[k]: {"old": a, "new": b} for k, (a, b) in plan.token_changes.items()},
            "num_layers": {"old": plan.old_config.num_layers, "new": plan.new_config.num_layers},
            "new_layer_positions": plan.new_layer_positions,
            "layer_sources": plan.layer_sources,
            "tau": {"qkv_tau": plan.new_config.qkv_tau, "proj_tau": plan.new_config.proj_tau,
                    "ffn_tau": plan.new_config.ffn_tau},
            "new_value_std": plan.new_value_std,
            "growth_seed": plan.seed,
            "reset_optimizer": plan.reset_optimizer,
        }
