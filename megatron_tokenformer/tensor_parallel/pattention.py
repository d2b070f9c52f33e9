"""Tensor-parallel Pattention: each TP rank holds one contiguous block of parameter tokens (docs/design.md §3).

Rank r of p holds key tokens K_r and value tokens V_r (rows [r*n/p, (r+1)*n/p) of the full K, V).
With the input X replicated on the TP group::

    A_r = X K_rᵀ                               local            [..., n/p]
    q   = all_reduce_norm(row statistic of A_r)                  [...]   (fp32, T numbers)
    S_r = f(A_r; q)                            local
    O   = all_reduce(S_r V_r)                  or the partial sum S_r V_r for the caller to reduce

This is Megatron's column-parallel (keys) + row-parallel (values) pair fused in one layer. f(A_r) V_r
is :func:`megatron_tokenformer.ops.pattention_norm.pattention_normalize_combine` (the memory-lean
autograd function shared with the single-device module) with the all-reduces of the row statistics
as its reductions, forward and backward.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from megatron_tokenformer import parallel_state
from megatron_tokenformer.ops.pattention_norm import (
    check_normalization,
    normalize_pattention_scores,
    pattention_normalize_combine,
)
from megatron_tokenformer.tensor_parallel.layers import linear_from_sequence_parallel_region
from megatron_tokenformer.tensor_parallel.mappings import (
    all_reduce_max_no_grad,
    all_reduce_norm,
    all_reduce_sum_no_grad,
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron_tokenformer.tensor_parallel.random import init_partitioned_, set_tensor_model_parallel_attributes


class ParallelPattention(nn.Module):
    """Pattention with its parameter tokens partitioned over the tensor-parallel group.

    Args:
        in_features, out_features: d_in, d_out (not partitioned).
        num_param_tokens: global n (must be divisible by the TP size).
        normalization, tau (None -> sqrt(n)), eps: as :class:`~megatron_tokenformer.model.Pattention`.
        key_init_std, value_init_std: init stds of the full master tensors.
        seed, layer_number, tag: identify the master tensors (``<tag>.key_param_tokens``...), so init is
            independent of TP size and construction order.
        copy_input: wrap the input in ``copy_to_tensor_model_parallel_region`` (gradient all-reduce).
            Set False when the caller did it once for several layers, or when the caller's
            communication turns the partial input gradient into the right thing itself.
        reduce_output: all-reduce the output (True) or return the partial sum S_r V_r (False).
        sequence_parallel: where the input would be copied, all-gather it along the sequence instead
            ([b, s/p, d_in] -> [b, s, d_in]; backward reduce-scatter); where the output would be
            all-reduced, reduce-scatter it along the sequence instead (-> [b, s/p, d_out]).
        params_dtype: dtype of the parameters.
        fused_norm: compile the normalisation's elementwise steps (``torch.compile``; same function).

    Parameters: ``key_param_tokens`` [n/p, d_in], ``value_param_tokens`` [n/p, d_out], both marked
    ``tensor_model_parallel=True, partition_dim=0``. Attributes: ``tau`` (float), ``num_param_tokens``
    (global n).
    forward: x [..., d_in] (replicated) -> [..., d_out] (replicated, or partial if not reduce_output).
    """

    def __init__(self, in_features: int, out_features: int, num_param_tokens: int,
                 normalization: str = "l2_norm_gelu", tau: Optional[float] = None, eps: float = 1e-6,
                 key_init_std: float = 0.02, value_init_std: float = 0.02, seed: int = 1234,
                 layer_number: int = 0, tag: str = "pattention", copy_input: bool = True,
                 reduce_output: bool = True, params_dtype: torch.dtype = torch.float32, device=None,
                 sequence_parallel: bool = False, fused_norm: bool = False):
        super().__init__()
        self.sequence_parallel = sequence_parallel
        self.fused_norm = bool(fused_norm)
        check_normalization(normalization)
        world = parallel_state.get_tensor_model_parallel_world_size()
        if num_param_tokens % world != 0:
            raise ValueError(f"{tag}: num_param_tokens ({num_param_tokens}) is not divisible by the "
                             f"tensor-model-parallel size ({world})")
        self.in_features = in_features
        self.out_features = out_features
        self.num_param_tokens = num_param_tokens
        self.num_param_tokens_per_partition = num_param_tokens // world
        self.normalization = normalization
        self.tau = float(math.sqrt(num_param_tokens) if tau is None else tau)
        self.eps = float(eps)
        self.copy_input = copy_input
        self.reduce_output = reduce_output
        self.tag = tag
        local = self.num_param_tokens_per_partition
        self.key_param_tokens = nn.Parameter(torch.empty(local, in_features, dtype=params_dtype, device=device))
        self.value_param_tokens = nn.Parameter(torch.empty(local, out_features, dtype=params_dtype, device=device))
        for p in (self.key_param_tokens, self.value_param_tokens):
            set_tensor_model_parallel_attributes(p, True, 0)
        init_partitioned_(self.key_param_tokens, (num_param_tokens, in_features), key_init_std, seed,
                          layer_number, f"{tag}.key_param_tokens")
        init_partitioned_(self.value_param_tokens, (num_param_tokens, out_features), value_init_std, seed,
                          layer_number, f"{tag}.value_param_tokens")

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """A_r = x K_rᵀ: [..., d_in] -> [..., n/p]."""
        return F.linear(x, self.key_param_tokens)

    def combine(self, weights: torch.Tensor) -> torch.Tensor:
        """Partial output S_r V_r: [..., n/p] -> [..., d_out]."""
        return torch.matmul(weights, self.value_param_tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gather = self.copy_input and self.sequence_parallel
        if self.copy_input and not self.sequence_parallel:
            x = copy_to_tensor_model_parallel_region(x)
        (out,) = parallel_pattention_partial_outputs([self], x, sequence_parallel_input=gather)
        if self.reduce_output:
            out = reduce_scatter_to_sequence_parallel_region(out) if self.sequence_parallel else \
                reduce_from_tensor_model_parallel_region(out)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"num_param_tokens={self.num_param_tokens} ({self.num_param_tokens_per_partition} per rank), "
                f"normalization={self.normalization}, tau={self.tau:g}")


def normalize_parallel_pattention_scores(layers: Sequence[ParallelPattention],
                                         scores: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """f(A_r) for several parallel Pattentions at once, by the autograd composition (the reference of the
    memory-lean path): ONE norm all-reduce (and, for softmax, one max all-reduce) for all of them. The
    layers must share normalization and eps."""
    normalization, eps, _ = _shared_normalization(layers)
    return normalize_pattention_scores(scores, normalization, [layer.tau for layer in layers],
                                       [layer.num_param_tokens for layer in layers], eps,
                                       sum_reduce=all_reduce_norm, max_reduce=all_reduce_max_no_grad)


def parallel_pattention_partial_outputs(layers: Sequence[ParallelPattention], x: torch.Tensor,
                                        lean: bool = True, sequence_parallel_input: bool = False) -> List[torch.Tensor]:
    """Partial outputs S_r V_r of several parallel Pattentions reading the same input x.

    x must already be wrapped by the caller (``copy_to_tensor_model_parallel_region`` once for all), or,
    with ``sequence_parallel_input``, be this rank's sequence chunk [b, s/p, d_in]: the scores of all
    layers are then computed from it by :func:`linear_from_sequence_parallel_region` (all-gathered along the
    sequence, only the chunk kept for backward; the input gradient is reduce-scattered).
    The norm statistics of all layers travel in one collective (forward; and the backward's row sums in
    one). lean=False: the autograd composition instead of the memory-lean function (tests, benchmarks).
    """
    normalization, eps, fused = _shared_normalization(layers)
    if sequence_parallel_input:
        scores = linear_from_sequence_parallel_region(x, [layer.key_param_tokens for layer in layers])
    else:
        scores = [layer.scores(x) for layer in layers]
    return pattention_normalize_combine(scores,
                                        [layer.value_param_tokens for layer in layers], normalization,
                                        [layer.tau for layer in layers], [layer.num_param_tokens for layer in layers],
                                        eps, sum_reduce=all_reduce_sum_no_grad, max_reduce=all_reduce_max_no_grad,
                                        lean=lean, fused=fused and lean)


def _shared_normalization(layers: Sequence[ParallelPattention]):
    norms = {(layer.normalization, layer.eps, getattr(layer, "fused_norm", False)) for layer in layers}
    if len(norms) != 1:
        raise ValueError(f"batched Pattention normalisation needs one normalization and eps (and one fused_norm), "
                         f"got {sorted(norms)}")
    return norms.pop()
