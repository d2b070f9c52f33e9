"""Net2Net width growth of the baseline Transformer (Chen, Goodfellow & Shlens 2016, "Net2WiderNet").

The paper's comparison point for Tokenformer's token growth: widen a trained GPT from d to d' by
duplicating units and splitting their outgoing weights, so that the wider network starts from the
narrow one's function. Used by tools/expand_checkpoint.py ``--hidden-size`` on a checkpoint of
``--model-type transformer``.

Why the residual width must grow by an integer factor k = d' / d
----------------------------------------------------------------
Net2WiderNet lets every new unit copy a randomly chosen old unit. Behind a LayerNorm that is not
function-preserving: LN normalises with the mean and variance over the d channels, and copying some
channels and not others changes both (a channel copied twice weighs twice in them). If instead
EVERY residual channel is copied the same number of times k, the widened vector h' = R h (R the
d' x d replication matrix) has mean(h') = mean(h) and var(h') = var(h) exactly, so with the
LayerNorm weight and bias replicated LN'(h') = R LN(h), epsilon included. That is the construction
used here: channel j of the wide model copies channel ``j mod d`` (the wide vector is k
concatenated copies of the narrow one). A non-integer d'/d is refused with that explanation.

Attention: the head size stays, the number of heads grows k-fold and head H' copies head
``H' mod h``. Keeping the head size keeps the 1/sqrt(head_dim) scale and the rotary frequencies
(they depend on the rotated width); widening each head instead would change both. Query channel
``c'`` of the wide model is then again channel ``c' mod d`` (channels are head-major).

The MLP width f may grow by any amount (f' >= f): units below ``f * (f' // f)`` copy unit
``u mod f``, the rest copy units drawn at random without replacement (Net2WiderNet's random mapping,
seeded); there is no normalisation over the MLP units, so uneven copy counts are exact.

The rule for every weight: rows (outputs) are copied, columns (inputs) are copied and divided by the
number of copies of their source unit, so that the copies' contributions add up to the original::

    embedding          E' = E[:, g]                         (tied: also the output layer)
    block LayerNorms   w' = w[g], b' = b[g]
    Q, K, V            W' = W[g][:, g] / k,   b' = b[g]
    attention.dense    W' = W[g][:, g] / k,   b' = b[g]      (each context channel has k copies)
    dense_h_to_4h      W' = W[m][:, g] / k,   b' = b[m]
    dense_4h_to_h      W' = W[g][:, m] / c[m], b' = b[g]    (c[u] copies of MLP unit u)
    final LayerNorm    w' = w[g] / k, b' = b[g] / k          (the tied logits sum over k copies)

with g(j) = j mod d and m the MLP mapping. The logits are then exactly the narrow model's (up to
float rounding). Tested in tests/checkpointing/test_net2net.py.

Symmetry
--------
Exactly duplicated units receive identical gradients (and, under Adam, identical updates even when
their outgoing weights are split unevenly, because Adam is invariant to a per-coordinate gradient
scale): without help they stay copies forever and the wide model never uses its extra width.
Chen et al. add a little noise to break the symmetry; ``noise_std`` (``--net2net-noise-std``) adds
N(0, (noise_std * std(W))^2) to the entries of each widened weight matrix that belong to a new copy
(a row or column index >= the old size), which makes the growth approximately, not exactly,
function-preserving. 0 (the default) is exact.

Optimizer state does not carry over a width change (the moments of the narrow model's entries have
no meaning for the split entries); the widened checkpoint has none and training starts Adam afresh.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from megatron_tokenformer.checkpointing.format.entries import FP32, ParamEntry
from megatron_tokenformer.checkpointing.format.source import Parts
from megatron_tokenformer.checkpointing.format.view import CheckpointView
from megatron_tokenformer.errors import TokenformerError
from megatron_tokenformer.model.spec import GROW_NET2NET_WIDTH, TransformerSpec, UnknownParameterError, get_spec

__all__ = ["Net2NetError", "WideningPlan", "WidenedView", "plan_widening", "plan_from_options",
           "widen_state_dict", "widen_tensor", "widened_shape"]

#: the family whose growth rule Net2Net implements; its classifier names each tensor's rule
_SPEC = TransformerSpec()


class Net2NetError(TokenformerError, ValueError):
    """The widening cannot be applied (message names the flag)."""


@dataclass
class WideningPlan:
    """A Net2Net widening d -> d' = k d (k = 1: no widening, a plain copy)."""

    old_config: object
    new_config: object
    mlp_map: List[int]          # new MLP unit -> old unit
    noise_std: float
    seed: int
    reset_optimizer: bool

    @property
    def factor(self) -> int:
        return self.new_config.hidden_size // self.old_config.hidden_size

    @property
    def widens(self) -> bool:
        return self.factor > 1 or len(self.mlp_map) != self.old_config.ffn_hidden_size


def _mlp_map(f_old: int, f_new: int, seed: int) -> List[int]:
    reps = f_new // f_old
    mapping = [u % f_old for u in range(reps * f_old)]
    extra = f_new - reps * f_old
    if extra:
        gen = torch.Generator().manual_seed(seed)
        mapping += torch.randperm(f_old, generator=gen)[:extra].tolist()
    return mapping


def plan_widening(config, hidden_size: Optional[int] = None, ffn_hidden_size: Optional[int] = None,
                  noise_std: float = 0.0, seed: int = 1234, reset_optimizer: bool = False) -> WideningPlan:
    """Validate a width-growth request against a transformer ``config`` and plan it."""
    if get_spec(config).growth_rule != GROW_NET2NET_WIDTH:
        raise Net2NetError("--hidden-size (Net2Net width growth) applies to checkpoints of --model-type transformer; a "
                           "Tokenformer grows by parameter tokens instead (--param-token-growth-factor or "
                           "--qkv-num-param-tokens/--proj-num-param-tokens/--ffn-num-param-tokens)")
    old = copy.deepcopy(config)
    d = old.hidden_size
    d_new = d if hidden_size is None else int(hidden_size)
    if d_new < d or d_new % d != 0:
        raise Net2NetError(
            f"--hidden-size {d_new} must be a multiple of the checkpoint's hidden size {d}: every residual channel "
            "has to be copied the same number of times, otherwise the LayerNorm mean and variance over the copies "
            "change and the widened model no longer computes the same function")
    k = d_new // d
    f_old = old.ffn_hidden_size
    f_new = f_old * k if ffn_hidden_size is None else int(ffn_hidden_size)
    if f_new < f_old:
        raise Net2NetError(f"--ffn-hidden-size {f_new} is smaller than the checkpoint's {f_old}: units can only be "
                           "added")
    if not (noise_std >= 0 and noise_std < float("inf")):
        raise Net2NetError(f"--net2net-noise-std must be a finite number >= 0, got {noise_std}")
    new = copy.deepcopy(old)
    new.hidden_size = d_new
    new.num_attention_heads = old.num_attention_heads * k
    new.ffn_hidden_size = f_new
    widens = k > 1 or f_new != f_old
    return WideningPlan(old, new, _mlp_map(f_old, f_new, seed), float(noise_std), int(seed),
                        bool(reset_optimizer or widens))


def plan_from_options(config, opts) -> WideningPlan:
    """The plan for tools/expand_checkpoint.py's options (:class:`~.expand.ExpandOptions`) on a transformer
    checkpoint (``--hidden-size``, ``--ffn-hidden-size``, ``--net2net-noise-std``; no flag: a plain copy,
    optimizer state kept, for resharding). Token and depth growth flags are refused for it."""
    if get_spec(config).growth_rule == GROW_NET2NET_WIDTH:
        given = [flag for flag, value in (
            ("--qkv-num-param-tokens", opts.qkv_num_param_tokens),
            ("--proj-num-param-tokens", opts.proj_num_param_tokens),
            ("--ffn-num-param-tokens", opts.ffn_num_param_tokens),
            ("--param-token-growth-factor", opts.param_token_growth_factor),
            ("--new-layer-positions", opts.new_layer_positions), ("--new-value-std", opts.new_value_std))
            if value is not None]
        if opts.num_layers is not None and opts.num_layers != config.num_layers:
            given.append("--num-layers")
        if given:
            raise Net2NetError(f"{', '.join(given)}: Tokenformer growth flags, but this checkpoint is a --model-type "
                               "transformer; widen it with --hidden-size (Net2Net)")
    elif opts.hidden_size is None and opts.ffn_hidden_size is not None:
        raise Net2NetError("--ffn-hidden-size (Net2Net width growth) applies to checkpoints of --model-type "
                           "transformer; a Tokenformer's FFN grows with --ffn-num-param-tokens")
    return plan_widening(config, opts.hidden_size, opts.ffn_hidden_size, opts.net2net_noise_std, opts.seed,
                         opts.reset_optimizer)


# --------------------------------------------------------------------------- the tensor rules
def _kind(name: str) -> str:
    """Which rule of the module docstring applies to a canonical parameter name: the role the
    Transformer spec gives it (:meth:`~megatron_tokenformer.model.spec.ModelSpec.classify`)."""
    try:
        return _SPEC.classify(name).role
    except UnknownParameterError:
        raise Net2NetError(f"do not know how to widen parameter {name!r}") from None


def widen_tensor(name: str, tensor: torch.Tensor, plan: WideningPlan) -> torch.Tensor:
    """The widened fp32 tensor of one canonical parameter (no noise)."""
    d = plan.old_config.hidden_size
    k = plan.factor
    g = torch.arange(d * k) % d
    m = torch.tensor(plan.mlp_map, dtype=torch.long)
    copies = torch.bincount(m, minlength=plan.old_config.ffn_hidden_size).to(torch.float32)
    t = tensor.to(torch.float32)
    kind = _kind(name)
    if kind == "embedding":
        return t[:, g].contiguous()
    if kind == "final_layernorm":
        return t[g] / k
    if kind == "vector":
        return t[g].contiguous()
    if kind == "mlp_vector":
        return t[m].contiguous()
    if kind == "square":
        return t[g][:, g] / k
    if kind == "h_to_4h":
        return t[m][:, g] / k
    if kind == "4h_to_h":
        return t[g][:, m] / copies[m][None, :]
    raise AssertionError(kind)


def widened_shape(name: str, shape: Tuple[int, ...], plan: WideningPlan) -> Tuple[int, ...]:
    """The shape :func:`widen_tensor` gives a tensor of ``shape``."""
    d, f = plan.new_config.hidden_size, plan.new_config.ffn_hidden_size
    kind = _kind(name)
    return {"embedding": (shape[0], d), "final_layernorm": (d,), "vector": (d,), "mlp_vector": (f,),
            "square": (d, d), "h_to_4h": (f, d), "4h_to_h": (d, f)}[kind]


def _new_copy_mask(name: str, shape: Tuple[int, ...], plan: WideningPlan) -> Optional[torch.Tensor]:
    """Entries of a widened weight matrix that belong to a new copy (row or column beyond the old size)."""
    if len(shape) != 2:
        return None
    kind = _kind(name)
    d, f = plan.old_config.hidden_size, plan.old_config.ffn_hidden_size
    old_rows, old_cols = {"embedding": (shape[0], d), "square": (d, d), "h_to_4h": (f, d),
                          "4h_to_h": (d, f)}[kind]
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[old_rows:, :] = True
    mask[:, old_cols:] = True
    return mask


def _noise(name: str, widened: torch.Tensor, old_std: float, plan: WideningPlan) -> torch.Tensor:
    mask = _new_copy_mask(name, tuple(widened.shape), plan)
    if mask is None or plan.noise_std == 0 or not mask.any():
        return widened
    from megatron_tokenformer.tensor_parallel.random import parameter_generator
    gen = parameter_generator(plan.seed, 0, f"net2net/{name}")
    noise = torch.empty(widened.shape).normal_(0.0, plan.noise_std * old_std, generator=gen)
    return widened + noise * mask


def widen_state_dict(state: Dict[str, torch.Tensor], plan: WideningPlan) -> Dict[str, torch.Tensor]:
    """Widen a canonical (TP = 1) ``{name: tensor}`` state dict, noise included."""
    out = {}
    for name, tensor in state.items():
        widened = widen_tensor(name, tensor, plan)
        out[name] = _noise(name, widened, float(tensor.float().std()) if tensor.numel() > 1 else 0.0, plan)
    return out


# --------------------------------------------------------------------------- checkpoint view
class WidenedView:
    """A :class:`CheckpointView` with a :class:`WideningPlan` applied; a
    :class:`~.format.source.CheckpointSource` (``params``, ``keys``, ``state_keys``, ``config``, ``read``, ...)."""

    def __init__(self, view: CheckpointView, plan: WideningPlan):
        self.view = view
        self.plan = plan
        self.config = plan.new_config
        self.reset_optimizer = plan.reset_optimizer
        self.state_keys = [] if plan.reset_optimizer else list(view.state_keys)
        self.params: Dict[str, ParamEntry] = {}
        for name, entry in view.params.items():
            shape = widened_shape(name, tuple(entry.shape), plan)
            step = None if plan.reset_optimizer else entry.step
            self.params[name] = ParamEntry(name, shape, entry.dtype, entry.partition_dim, entry.vocab, step)
        self.keys = [FP32] + self.state_keys

    def source_name(self, name: str) -> str:
        return name

    def describe(self, name: str) -> str:
        old, new = tuple(self.view.params[name].shape), tuple(self.params[name].shape)
        if old == new:
            return "copied"
        return f"{name}: {list(old)} -> {list(new)} (Net2Net: copies, split inputs)"

    def read(self, name: str, key: str = FP32) -> torch.Tensor:
        if key != FP32 and key not in self.state_keys:
            raise KeyError(f"{name}: no optimizer state {key!r} (the optimizer is reset by width growth)")
        old = self.view.read(name, key)
        if not self.plan.widens:
            return old
        widened = widen_tensor(name, old, self.plan)
        return _noise(name, widened, float(old.std()) if old.numel() > 1 else 0.0, self.plan)

    def plan_parts(self, name: str, key: str = FP32) -> Optional[Parts]:
        """Byte copies of the source when nothing is widened; None (read whole) otherwise."""
        if key != FP32 and key not in self.state_keys:
            raise KeyError(f"{name}: no optimizer state {key!r} (the optimizer is reset by width growth)")
        return None if self.plan.widens else self.view.plan_parts(name, key)

    def report(self) -> Dict[str, object]:
        plan = self.plan
        return {
            "net2net": {
                "hidden_size": {"old": plan.old_config.hidden_size, "new": plan.new_config.hidden_size},
                "num_attention_heads": {"old": plan.old_config.num_attention_heads,
                                        "new": plan.new_config.num_attention_heads},
                "ffn_hidden_size": {"old": plan.old_config.ffn_hidden_size, "new": plan.new_config.ffn_hidden_size},
                "factor": plan.factor,
                "noise_std": plan.noise_std,
                "exact": plan.noise_std == 0,
            },
            "seed": plan.seed,
            "reset_optimizer": plan.reset_optimizer,
        }
