"""Causal attention across the context-parallel split (docs/design.md, "Context parallelism").

Each context-parallel rank holds 2 chunks of every sequence (:mod:`megatron_tokenformer.tensor_parallel.context_parallel`:
rank r keeps chunks r and 2·cp − 1 − r). Its queries need the keys and values of every earlier position,
most of which live on other ranks. The all-gather form (Llama 3's choice): K and V of the local tokens
(rotary already applied at their global positions) are all-gathered over the context-parallel group in
ONE collective, [2, b, s/cp, h, d_h] -> [2, b, s, h, d_h]; the local queries attend to all of them under
the causal mask built from global positions (key position <= query position); backward reduce-scatters
dK and dV, so each rank receives the sum over all ranks' queries of its own keys' and values' gradients.

Per layer and rank: forward all-gather of 2·b·s·h·d_h/cp elements handed to the collective
(2·b·s·h·d_h·(cp − 1)/cp received), backward the same in a reduce-scatter; the gathered K, V
(2·b·s·h·d_h, the whole sequence) are kept for backward unless the attention core is recomputed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_tokenformer import parallel_state
from megatron_tokenformer.model.rotary import RotaryEmbedding, apply_rotary_pos_emb
from megatron_tokenformer.tensor_parallel.context_parallel import causal_mask, gathered_positions, local_positions
from megatron_tokenformer.tensor_parallel.mappings import gather_from_context_parallel_region

__all__ = ["context_parallel_attention"]


def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               rotary_emb: "RotaryEmbedding | None") -> torch.Tensor:
    """q, k, v: [b, s/cp, h, d_h] of this context-parallel rank's tokens (its two chunks, local order)
    -> context [b, s/cp, h, d_h]: causal attention of the local queries over the whole sequence."""
    cp = parallel_state.get_context_parallel_world_size()
    rank = parallel_state.get_context_parallel_rank()
    b, s_local = q.shape[0], q.shape[1]
    seq = s_local * cp
    positions = local_positions(seq, cp, rank, device=q.device)
    if rotary_emb is not None:
        cos, sin = rotary_emb(seq, device=q.device)
        cos, sin = cos[positions], sin[positions]
        q, k = apply_rotary_pos_emb(q, cos, sin), apply_rotary_pos_emb(k, cos, sin)
    kv = gather_from_context_parallel_region(torch.stack([k, v]), dim=2)  # [2, b, s, h, d_h]
    k_all, v_all = kv.unbind(0)
    mask = causal_mask(positions, gathered_positions(seq, cp, device=q.device))  # [s/cp, s]
    context = F.scaled_dot_product_attention(q.transpose(1, 2), k_all.transpose(1, 2), v_all.transpose(1, 2),
                                             attn_mask=mask)
    return context.transpose(1, 2)
