"""Causal attention across the context-parallel split (docs/design.md, "Context parallelism").

Each context-parallel rank holds 2 chunks of c = s / (2·cp) tokens of every sequence
(:mod:`megatron_tokenformer.tensor_parallel.context_parallel`: rank r keeps chunks r and 2·cp − 1 − r). Its
queries need the keys and values of every earlier position, most of which live on other ranks. The
all-gather form (Llama 3's choice): K and V of the local tokens (rotary already applied at their global
positions) are all-gathered over the context-parallel group in ONE collective,
[2, b, s/cp, h, d_h] -> [2, b, s, h, d_h], and put in position order; backward reduce-scatters dK and dV, so
each rank receives the sum over all ranks' queries of its own keys' and values' gradients.

Three implementations of the same function (:func:`attention_implementation` chooses by device):

- ``"sdpa"`` (CUDA): per local query chunk, ``scaled_dot_product_attention`` with torch's bottom-right
  causal bias (``causal_lower_right``), which the flash / memory-efficient CUDA kernels apply without
  materialising a mask;
- ``"cpu_flash"`` (CPU; torch's SDPA would materialise and keep that bias as a dense fp32 mask there):
  :class:`CpuFlashChunkCausalAttention`, torch's CPU flash kernel on the keys before a chunk and on its
  diagonal block, merged by log-sum-exp;
- ``"chunked"`` (other devices): :class:`ChunkCausalAttention` below, plain torch ops.

The attention itself (:class:`ChunkCausalAttention`): local query chunk j, starting at global position
p_j, attends to the keys [0, p_j + c) -- all keys before the chunk, unmasked, and the chunk's own diagonal
block, causally. A dense [s/cp, s] mask handed to ``scaled_dot_product_attention`` would be kept for
backward (as fp32 on the CPU kernel: 4·s²/cp bytes per layer, more than everything else at long sequences),
so the function does what a flash kernel does with the bottom-right causal alignment: forward keeps only
q, the gathered K and V, the output and the fp32 log-sum-exp of each query row; backward recomputes each
chunk's probabilities from them (P = exp(q kᵀ·scale − lse); dV = Pᵀ dO;
dS = P ⊙ (dO Vᵀ − rowsum(dO ⊙ O)); dQ = dS K·scale; dK = dSᵀ Q·scale). The scores exist only transiently, in
tiles of at most
:data:`TILE_ELEMENTS` (query rows of a chunk against their keys).

Per layer and rank: forward all-gather of 2·b·s·h·d_h/cp elements handed to the collective
(2·b·s·h·d_h·(cp − 1)/cp received), backward the same in a reduce-scatter; kept for backward: the gathered
K, V (2·b·s·h·d_h, the whole sequence: the all-gather form's O(s) memory), q and the output (b·s·h·d_h/cp
each) and the log-sum-exp (4·b·h·s/cp bytes).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from megatron_tokenformer import parallel_state
from megatron_tokenformer.model.rotary import RotaryEmbedding, apply_rotary_pos_emb
from megatron_tokenformer.tensor_parallel.context_parallel import gathered_positions, local_positions, rank_chunks
from megatron_tokenformer.tensor_parallel.mappings import gather_from_context_parallel_region

__all__ = ["ChunkCausalAttention", "CpuFlashChunkCausalAttention", "chunk_causal_attention",
           "cpu_flash_chunk_causal_attention", "sdpa_lower_right_attention", "attention_implementation",
           "context_parallel_attention"]


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _tile_scores(q_rows, k, start, row0, row1, scale):
    """Scores [b, h, row1 - row0, start + row1] (fp32, float64 for float64 inputs) of the query rows
    [row0, row1) of a chunk whose first token sits at global position ``start``, against the keys they may
    see: [0, start + row1), with -inf where a key lies after the query (the diagonal block's upper part)."""
    length = start + row1
    scores = torch.matmul(q_rows, k[:, :, :length].transpose(-1, -2)).to(_stats_dtype(q_rows)) * scale
    query_pos = torch.arange(start + row0, start + row1, device=scores.device)[:, None]
    key_pos = torch.arange(start, length, device=scores.device)[None, :]
    scores[..., start:length].masked_fill_(key_pos > query_pos, float("-inf"))
    return scores


#: elements of one transient score tile [b, h, rows, keys]: the query rows of a chunk are processed in
#: tiles of at most this many scores (64 MiB in fp32), so long sequences never hold a chunk's whole score matrix
TILE_ELEMENTS = 2 ** 24


def _row_tiles(chunk: int, start: int, batch_heads: int):
    """(first row, end row) tiles of a query chunk whose keys are [0, start + chunk)."""
    rows = max(1, min(chunk, TILE_ELEMENTS // max(1, batch_heads * (start + chunk))))
    return [(r, min(r + rows, chunk)) for r in range(0, chunk, rows)]


class ChunkCausalAttention(torch.autograd.Function):
    """q: [b, h, n·c, d] (n query chunks of c tokens; chunk j's first token at global position starts[j]);
    k, v: [b, h, s, d] in position order -> out [b, h, n·c, d]. Softmax statistics and gradient sums in
    fp32 (float64 for float64 inputs)."""

    @staticmethod
    def forward(ctx, q, k, v, starts, chunk, scale):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:-1], dtype=_stats_dtype(q), device=q.device)
        batch_heads = q.shape[0] * q.shape[1]
        for j, start in enumerate(starts):
            for row0, row1 in _row_tiles(chunk, start, batch_heads):
                rows = slice(j * chunk + row0, j * chunk + row1)
                scores = _tile_scores(q[:, :, rows], k, start, row0, row1, scale)
                lse[:, :, rows] = torch.logsumexp(scores, dim=-1)
                probs = torch.exp(scores - lse[:, :, rows, None]).to(v.dtype)
                out[:, :, rows] = torch.matmul(probs, v[:, :, :start + row1])
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.starts, ctx.chunk, ctx.scale = tuple(starts), chunk, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        chunk, scale = ctx.chunk, ctx.scale
        acc = _stats_dtype(q)
        dq = torch.empty_like(q)
        dk = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        batch_heads = q.shape[0] * q.shape[1]
        tiles = [(j, start, row0, row1) for j, start in enumerate(ctx.starts)
                 for row0, row1 in _row_tiles(chunk, start, batch_heads)]
        for j, start, row0, row1 in tiles:
            rows, keys = slice(j * chunk + row0, j * chunk + row1), slice(0, start + row1)
            q_j, do_j = q[:, :, rows], grad_out[:, :, rows]
            probs = torch.exp(_tile_scores(q_j, k, start, row0, row1, scale) - lse[:, :, rows, None])
            do_j = do_j.to(acc)
            dv[:, :, keys] += torch.matmul(probs.transpose(-1, -2), do_j)
            dprobs = torch.matmul(do_j, v[:, :, keys].to(acc).transpose(-1, -2))
            delta = (do_j * out[:, :, rows].to(acc)).sum(dim=-1, keepdim=True)
            dscores = probs * (dprobs - delta) * scale
            dq[:, :, rows] = torch.matmul(dscores, k[:, :, keys].to(acc)).to(q.dtype)
            dk[:, :, keys] += torch.matmul(dscores.transpose(-1, -2), q_j.to(acc))
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None


class CpuFlashChunkCausalAttention(torch.autograd.Function):
    """The function of :class:`ChunkCausalAttention` on torch's CPU flash-attention kernel: per query chunk,
    one call over the keys before it (no mask) and one over its diagonal block (causal, square), merged by
    their log-sum-exp (o = Σ exp(lse_i − lse)·o_i, lse = log Σ exp lse_i). Backward runs the kernel's backward
    on each part with the MERGED output and log-sum-exp, which gives each part's exact share of dQ, dK, dV
    (the probabilities exp(q kᵀ·scale − lse) and rowsum(dO ⊙ O) are those of the whole softmax)."""

    @staticmethod
    def forward(ctx, q, k, v, starts, chunk, scale):
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        acc = _stats_dtype(q)
        out_all = torch.empty_like(q)  # q's memory layout: the caller's transpose back is then a view
        lse_all = torch.empty(q.shape[:-1], dtype=acc, device=q.device)
        for j, start in enumerate(starts):
            q_j = q[:, :, j * chunk:(j + 1) * chunk]
            out, lse = flash(q_j, k[:, :, start:start + chunk], v[:, :, start:start + chunk], 0.0, True, scale=scale)
            if start > 0:
                out_past, lse_past = flash(q_j, k[:, :, :start], v[:, :, :start], 0.0, False, scale=scale)
                merged = torch.logaddexp(lse.to(acc), lse_past.to(acc))
                out = (torch.exp(lse.to(acc) - merged)[..., None] * out.to(acc)
                       + torch.exp(lse_past.to(acc) - merged)[..., None] * out_past.to(acc)).to(q.dtype)
                lse = merged
            out_all[:, :, j * chunk:(j + 1) * chunk] = out
            lse_all[:, :, j * chunk:(j + 1) * chunk] = lse
        out, lse = out_all, lse_all
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.starts, ctx.chunk, ctx.scale = tuple(starts), chunk, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        q, k, v, out, lse = ctx.saved_tensors
        chunk, scale = ctx.chunk, ctx.scale
        acc = _stats_dtype(q)
        grad_out = grad_out.contiguous()
        dq = torch.empty_like(q)
        dk = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        for j, start in enumerate(ctx.starts):
            rows, diag = slice(j * chunk, (j + 1) * chunk), slice(start, start + chunk)
            args = (grad_out[:, :, rows], q[:, :, rows])
            saved = (out[:, :, rows], lse[:, :, rows])
            dq_j, dk_j, dv_j = backward(*args, k[:, :, diag], v[:, :, diag], *saved, 0.0, True, scale=scale)
            dk[:, :, diag] += dk_j.to(acc)
            dv[:, :, diag] += dv_j.to(acc)
            dq_j = dq_j.to(acc)
            if start > 0:
                dq_p, dk_p, dv_p = backward(*args, k[:, :, :start], v[:, :, :start], *saved, 0.0, False, scale=scale)
                dq_j = dq_j + dq_p.to(acc)
                dk[:, :, :start] += dk_p.to(acc)
                dv[:, :, :start] += dv_p.to(acc)
            dq[:, :, rows] = dq_j.to(q.dtype)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None


def chunk_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: Sequence[int],
                           chunk: int) -> torch.Tensor:
    """Causal attention of query chunks at global positions ``starts`` (each ``chunk`` long) over keys in
    position order. q: [b, h, len(starts)·chunk, d]; k, v: [b, h, s, d] -> [b, h, len(starts)·chunk, d]."""
    return ChunkCausalAttention.apply(q, k, v, tuple(int(s) for s in starts), int(chunk),
                                      1.0 / math.sqrt(q.shape[-1]))


def cpu_flash_chunk_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: Sequence[int],
                                     chunk: int) -> torch.Tensor:
    """:func:`chunk_causal_attention` on torch's CPU flash-attention kernel (:class:`CpuFlashChunkCausalAttention`)."""
    return CpuFlashChunkCausalAttention.apply(q, k, v, tuple(int(s) for s in starts), int(chunk),
                                              1.0 / math.sqrt(q.shape[-1]))


def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               rotary_emb: "RotaryEmbedding | None") -> torch.Tensor:
    """q, k, v: [b, s/cp, h, d_h] of this context-parallel rank's tokens (its two chunks, local order)
    -> context [b, s/cp, h, d_h]: causal attention of the local queries over the whole sequence."""
    cp = parallel_state.get_context_parallel_world_size()
    rank = parallel_state.get_context_parallel_rank()
    s_local = q.shape[1]
    seq, chunk = s_local * cp, s_local // 2
    if rotary_emb is not None:
        cos, sin = rotary_emb(seq, device=q.device)
        positions = local_positions(seq, cp, rank, device=q.device)
        cos, sin = cos[positions], sin[positions]
        q, k = apply_rotary_pos_emb(q, cos, sin), apply_rotary_pos_emb(k, cos, sin)
    kv = gather_from_context_parallel_region(torch.stack([k, v]), dim=2)  # [2, b, s, h, d_h], rank order
    order = torch.argsort(gathered_positions(seq, cp, device=q.device))
    k_all, v_all = kv.index_select(2, order).transpose(2, 3).unbind(0)  # [b, h, s, d_h] each, position order
    starts = [c * chunk for c in rank_chunks(cp, rank)]
    kernel = {"sdpa": sdpa_lower_right_attention, "cpu_flash": cpu_flash_chunk_causal_attention,
              "chunked": chunk_causal_attention}[attention_implementation(q.device.type)]
    return kernel(q.transpose(1, 2), k_all, v_all, starts, chunk).transpose(1, 2)


def attention_implementation(device_type: str) -> str:
    """``"sdpa"`` on CUDA (flash / memory-efficient kernels apply the bottom-right causal bias without a
    mask), ``"cpu_flash"`` on the CPU (torch's CPU flash kernel, two calls per chunk merged by log-sum-exp:
    its SDPA entry point would keep a dense fp32 [c, s] mask), ``"chunked"`` elsewhere (plain torch ops)."""
    return {"cuda": "sdpa", "cpu": "cpu_flash"}.get(device_type, "chunked")


def sdpa_lower_right_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: Sequence[int],
                               chunk: int) -> torch.Tensor:
    """The same function as :func:`chunk_causal_attention` through ``scaled_dot_product_attention``: query
    chunk j attends to keys [0, starts[j] + chunk) with the bottom-right causal alignment."""
    from torch.nn.attention.bias import causal_lower_right

    outs = []
    for j, start in enumerate(starts):
        length = int(start) + chunk
        q_j = q[:, :, j * chunk:(j + 1) * chunk]
        outs.append(F.scaled_dot_product_attention(q_j, k[:, :, :length], v[:, :, :length],
                                                   attn_mask=causal_lower_right(chunk, length)))
    return torch.cat(outs, dim=2)
