"""Context parallelism: the load-balanced causal split of each sequence over the context-parallel ranks.

A sequence of length s is cut into 2·cp chunks of c = s / (2·cp) tokens; context-parallel rank r keeps
chunks r and 2·cp − 1 − r, in that order (Megatron-LM's scheme)::

    cp = 2, s = 8:   chunks  [0 1] [2 3] [4 5] [6 7]
                     rank 0: [0 1]             [6 7]   (positions 0, 1, 6, 7)
                     rank 1:       [2 3] [4 5]         (positions 2, 3, 4, 5)

Under causal attention an early chunk attends to few keys and its mirror to many, so every rank does the
same attention work. Tokens, labels, loss mask and positions are split alike (:func:`split_for_rank`);
rotary embeddings use the global positions (:func:`local_positions`). :func:`merge_from_ranks` is the
inverse (tests, tools). Everything here is a pure function of (sequence length, cp, rank); the
``*_on_this_rank`` helpers read cp and the rank from :mod:`megatron_tokenformer.parallel_state`.

The attention across the split (K and V all-gathered over the context-parallel group, their gradients
reduce-scattered) is :mod:`megatron_tokenformer.model.context_parallel`; the collectives are in
:mod:`megatron_tokenformer.tensor_parallel.mappings`.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from megatron_tokenformer import parallel_state

__all__ = ["check_divisible", "chunk_size", "rank_chunks", "local_positions", "gathered_positions",
           "split_for_rank", "merge_from_ranks", "causal_mask", "split_batch_on_this_rank"]


def check_divisible(seq_length: int, cp: int, tp_sequence_parallel: int = 1) -> None:
    """Raise ValueError unless ``seq_length`` splits into 2·cp chunks (each also split over the
    ``tp_sequence_parallel`` tensor-parallel ranks with sequence parallelism)."""
    if cp < 1:
        raise ValueError(f"context-parallel size must be >= 1, got {cp}")
    multiple = 2 * cp * tp_sequence_parallel if cp > 1 else tp_sequence_parallel
    if seq_length % multiple != 0:
        what = f"2 x context-parallel size ({cp})" if cp > 1 else ""
        if tp_sequence_parallel > 1:
            what = (what + " x " if what else "") + f"tensor-parallel size ({tp_sequence_parallel}, sequence parallel)"
        raise ValueError(f"sequence length {seq_length} is not divisible by {what} = {multiple}")


def chunk_size(seq_length: int, cp: int) -> int:
    """Tokens per chunk, s / (2·cp)."""
    check_divisible(seq_length, cp)
    return seq_length // (2 * cp) if cp > 1 else seq_length


def rank_chunks(cp: int, rank: int) -> Tuple[int, int]:
    """The two chunk indices context-parallel rank ``rank`` holds: (rank, 2·cp − 1 − rank)."""
    if not 0 <= rank < cp:
        raise ValueError(f"context-parallel rank {rank} outside [0, {cp})")
    return rank, 2 * cp - 1 - rank


def local_positions(seq_length: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """Global positions of rank ``rank``'s tokens, in its local order: long [s / cp]."""
    if cp == 1:
        return torch.arange(seq_length, device=device)
    c = chunk_size(seq_length, cp)
    first, second = rank_chunks(cp, rank)
    return torch.cat([torch.arange(first * c, (first + 1) * c, device=device),
                      torch.arange(second * c, (second + 1) * c, device=device)])


def gathered_positions(seq_length: int, cp: int, device=None) -> torch.Tensor:
    """Global positions of the tokens of a sequence all-gathered over the context-parallel group (rank r's
    local tokens at block r): long [s]."""
    return torch.cat([local_positions(seq_length, cp, r, device=device) for r in range(cp)])


def split_for_rank(x: torch.Tensor, cp: int, rank: int, dim: int = 1) -> torch.Tensor:
    """Rank ``rank``'s part of ``x`` along the sequence dimension ``dim``: [.., s, ..] -> [.., s / cp, ..]
    (chunk rank, then chunk 2·cp − 1 − rank). The identity at cp = 1."""
    if cp == 1:
        return x
    seq = x.shape[dim]
    c = chunk_size(seq, cp)
    first, second = rank_chunks(cp, rank)
    return torch.cat([x.narrow(dim, first * c, c), x.narrow(dim, second * c, c)], dim=dim)


def merge_from_ranks(parts: Sequence[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`split_for_rank`: every rank's part (rank order) -> the whole sequence."""
    cp = len(parts)
    if cp == 1:
        return parts[0]
    c = parts[0].shape[dim] // 2
    chunks: List[Optional[torch.Tensor]] = [None] * (2 * cp)
    for rank, part in enumerate(parts):
        first, second = rank_chunks(cp, rank)
        chunks[first], chunks[second] = part.narrow(dim, 0, c), part.narrow(dim, c, c)
    return torch.cat(chunks, dim=dim)


def causal_mask(query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
    """bool [s_q, s_k]: True where the query may attend to the key (key position <= query position)."""
    return key_positions[None, :] <= query_positions[:, None]


def split_batch_on_this_rank(*tensors: torch.Tensor, dim: int = 1) -> Tuple[torch.Tensor, ...]:
    """This context-parallel rank's part of each [b, s, ...] tensor (tokens, labels, loss mask); the
    tensors unchanged without context parallelism."""
    cp = parallel_state.get_context_parallel_world_size()
    if cp == 1:
        return tensors
    rank = parallel_state.get_context_parallel_rank()
    return tuple(split_for_rank(t, cp, rank, dim=dim) for t in tensors)
