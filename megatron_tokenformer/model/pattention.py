"""Pattention: attention from input tokens to learnable parameter tokens (docs/design.md §1).

    A = X Kᵀ        [..., n]        K: key parameter tokens   [n, d_in]
    S = f(A)        normalised over the n parameter tokens
    O = S V         [..., d_out]    V: value parameter tokens [n, d_out]

The drop-in single-device layer. f(A) V is
:func:`megatron_tokenformer.ops.pattention_norm.pattention_normalize_combine`,
the one memory-lean autograd function shared with the tensor-parallel ``ParallelPattention`` (no reduction
here: all n tokens are local). No biases.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_tokenformer.ops.pattention_norm import (
    NORMALIZATIONS,
    check_normalization,
    normalize_pattention_scores,
    pattention_normalize_combine,
)

__all__ = ["Pattention", "NORMALIZATIONS", "normalize_pattention_scores"]

class Pattention(nn.Module):
    """Drop-in token-parameter attention layer (no torch.distributed needed).

    Args:
        in_features, out_features: d_in, d_out.
        num_param_tokens: n.
        normalization: "l2_norm_gelu" (default, the paper's), "gelu_l2_norm" or "softmax".
        tau: scale; defaults to sqrt(n) at construction and is then kept (also by :meth:`grow`).
        eps: added under the square root of the fp32 row norm.
        key_init_std / value_init_std: N(0, std^2) init of the key / value tokens.
        fused_norm: compile the normalisation's elementwise steps (``torch.compile``; same function).

    Parameters: ``key_param_tokens`` [n, d_in], ``value_param_tokens`` [n, d_out].
    forward: x [..., d_in] -> [..., d_out] (x must have the parameters' dtype, as nn.Linear).
    """

    def __init__(self, in_features: int, out_features: int, num_param_tokens: int,
                 normalization: str = "l2_norm_gelu", tau: Optional[float] = None, eps: float = 1e-6,
                 key_init_std: float = 0.02, value_init_std: float = 0.02, device=None, dtype=None,
                 fused_norm: bool = False):
        super().__init__()
        check_normalization(normalization)
        for name, value in (("in_features", in_features), ("out_features", out_features),
                            ("num_param_tokens", num_param_tokens)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Pattention: {name} must be a positive integer, got {value!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.num_param_tokens = num_param_tokens
        self.normalization = normalization
        self.tau = float(math.sqrt(num_param_tokens) if tau is None else tau)
        self.eps = float(eps)
        self.fused_norm = bool(fused_norm)
        self.key_init_std = float(key_init_std)
        self.value_init_std = float(value_init_std)
        factory = {"device": device, "dtype": dtype}
        self.key_param_tokens = nn.Parameter(torch.empty(num_param_tokens, in_features, **factory))
        self.value_param_tokens = nn.Parameter(torch.empty(num_param_tokens, out_features, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.key_param_tokens, mean=0.0, std=self.key_init_std)
        nn.init.normal_(self.value_param_tokens, mean=0.0, std=self.value_init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Pattention expects last dimension {self.in_features}, got input shape {tuple(x.shape)}")
        scores = F.linear(x, self.key_param_tokens)
        (out,) = pattention_normalize_combine([scores], [self.value_param_tokens], self.normalization, [self.tau],
                                              [self.num_param_tokens], self.eps,
                                              fused=self.fused_norm)
        return out

    @torch.no_grad()
    def grow(self, num_new_tokens: int, new_value_std: Optional[float] = None,
             allow_function_change: bool = False, generator: Optional[torch.Generator] = None) -> None:
        """Append ``num_new_tokens`` parameter tokens, keeping the function (docs/design.md §5).

        New key tokens are zero: their scores are 0, they add nothing to the row norm and
        GeLU(0) = 0, so the output is unchanged whatever the new values are. New value tokens are
        N(0, new_value_std^2) (default: ``value_init_std``) so the new keys get a gradient
        (GeLU'(0) = 1/2) and the new tokens train. tau is kept.

        ``softmax`` cannot grow without changing the function (exp(0) = 1 gives every new token
        weight, and the n scale changes): it raises ValueError unless ``allow_function_change=True``,
        which grows anyway with a warning.

        The parameters are replaced by new ``nn.Parameter`` objects: rebuild the optimizer afterwards.
        """
        if not isinstance(num_new_tokens, int) or num_new_tokens < 1:
            raise ValueError(f"grow: num_new_tokens must be a positive integer, got {num_new_tokens!r}")
        if self.normalization == "softmax":
            message = ("grow: a softmax Pattention cannot add parameter tokens without changing its output: a "
                       "zero key scores exp(0) = 1 and takes probability mass from the existing tokens (and the "
                       "n * softmax scale changes). Use l2_norm_gelu or gelu_l2_norm, or pass "
                       "allow_function_change=True to grow anyway.")
            if not allow_function_change:
                raise ValueError(message)
            warnings.warn(message.replace("grow:", "grow (allow_function_change=True):"), stacklevel=2)
        std = self.value_init_std if new_value_std is None else float(new_value_std)
        keys, values = self.key_param_tokens, self.value_param_tokens
        new_keys = torch.zeros(num_new_tokens, self.in_features, dtype=keys.dtype, device=keys.device)
        new_values = torch.empty(num_new_tokens, self.out_features, dtype=torch.float32, device="cpu")
        new_values.normal_(0.0, std, generator=generator)
        new_values = new_values.to(dtype=values.dtype, device=values.device)
        self.key_param_tokens = nn.Parameter(torch.cat([keys.detach(), new_keys], dim=0),
                                             requires_grad=keys.requires_grad)
        self.value_param_tokens = nn.Parameter(torch.cat([values.detach(), new_values], dim=0),
                                               requires_grad=values.requires_grad)
        self.num_param_tokens += num_new_tokens

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"num_param_tokens={self.num_param_tokens}, normalization={self.normalization}, tau={self.tau:g}")
