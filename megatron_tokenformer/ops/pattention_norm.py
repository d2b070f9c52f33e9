"""The Pattention score normalisation f(A), below both ``model/`` and ``tensor_parallel/`` (docs/design.md §1).

One implementation, parametrised by the reductions over the parameter-token dimension: the
single-device :class:`~megatron_tokenformer.model.pattention.Pattention` passes none (all n tokens are
local); :class:`~megatron_tokenformer.tensor_parallel.pattention.ParallelPattention` passes the
cross-rank all-reduces (each rank holds n/p tokens). Several score tensors can be normalised with one
batched reduction (the Q/K/V Pattentions of attention use one collective).

Statistics (norms, softmax max and sum) are computed in fp32 for fp32/bf16/fp16 inputs, with eps
under the square root so an all-zero row gives zeros, not NaN. GeLU is the exact (erf) one.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F

from megatron_tokenformer.config import PATTENTION_NORMALIZATIONS as NORMALIZATIONS

Reduction = Optional[Callable[[torch.Tensor], torch.Tensor]]


def check_normalization(normalization: str) -> None:
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown Pattention normalization {normalization!r}; choose one of {NORMALIZATIONS}")


def _reduce_batched(stats: List[torch.Tensor], reduce: Reduction) -> List[torch.Tensor]:
    """Apply ``reduce`` once to all row statistics (concatenated), split the result back."""
    if reduce is None:
        return stats
    if len(stats) == 1:
        return [reduce(stats[0])]
    flat = reduce(torch.cat([s.reshape(-1) for s in stats]))
    out, offset = [], 0
    for s in stats:
        out.append(flat[offset:offset + s.numel()].view(s.shape))
        offset += s.numel()
    return out


def normalize_pattention_scores(scores: Sequence[torch.Tensor], normalization: str, taus: Sequence[float],
                                num_param_tokens: Sequence[int], eps: float = 1e-6,
                                sum_reduce: Reduction = None, max_reduce: Reduction = None) -> List[torch.Tensor]:
    """f(A) for one or several score tensors; returns tensors of the input dtype.

    scores: each [..., n_local] (this rank's parameter tokens, last dim).
    taus: tau per tensor (l2_norm_gelu, gelu_l2_norm). num_param_tokens: the GLOBAL n per tensor
    (the softmax is scaled by n).
    sum_reduce: sums a row statistic over the partitions of the token dimension (autograd-aware:
    its backward must also sum, e.g. ``all_reduce_norm``); None when all tokens are local.
    max_reduce: element-wise max over the partitions, without gradient (softmax only).
    Each reduction is called ONCE for all tensors together.

    - l2_norm_gelu:  GeLU(tau * A / sqrt(sum_j A_j^2 + eps))
    - gelu_l2_norm:  tau * G / sqrt(sum_j G_j^2 + eps),  G = GeLU(A)
    - softmax:       n * exp(A - m) / sum_j exp(A_j - m),  m = max_j A_j (no gradient through m)
    """
    check_normalization(normalization)
    dtypes = [s.dtype for s in scores]
    a32 = [s.float() for s in scores]
    if normalization == "l2_norm_gelu":
        sq = _reduce_batched([(a * a).sum(dim=-1) for a in a32], sum_reduce)
        out = [F.gelu(a * (tau * torch.rsqrt(q + eps)).unsqueeze(-1)) for a, q, tau in zip(a32, sq, taus)]
    elif normalization == "gelu_l2_norm":
        g32 = [F.gelu(a) for a in a32]
        sq = _reduce_batched([(g * g).sum(dim=-1) for g in g32], sum_reduce)
        out = [g * (tau * torch.rsqrt(q + eps)).unsqueeze(-1) for g, q, tau in zip(g32, sq, taus)]
    else:
        with torch.no_grad():
            maxes = _reduce_batched([a.detach().amax(dim=-1) for a in a32], max_reduce)
        exps = [torch.exp(a - m.unsqueeze(-1)) for a, m in zip(a32, maxes)]
        sums = _reduce_batched([e.sum(dim=-1) for e in exps], sum_reduce)
        out = [e * (float(n) / z).unsqueeze(-1) for e, z, n in zip(exps, sums, num_param_tokens)]
    return [o.to(dt) for o, dt in zip(out, dtypes)]
