"""Tensor-parallel layers: vocab-parallel embedding and logits, column/row-parallel linear, and the
sequence-parallel input linear (:func:`linear_from_sequence_parallel_region`).

All weights are initialised as slices of a full master tensor drawn from a per-parameter generator
(see :mod:`megatron_tokenformer.tensor_parallel.random`), so the TP=p shards equal the matching
slices of the TP=1 weights for the same seed.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from megatron_tokenformer import parallel_state
from megatron_tokenformer.tensor_parallel.mappings import (
    _all_gather_seq,
    _reduce_scatter_seq,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron_tokenformer.tensor_parallel.random import init_partitioned_, set_tensor_model_parallel_attributes
from megatron_tokenformer.tensor_parallel.utils import VocabUtility, check_token_ids, divide


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows (the padded vocabulary) are split over the TP group.

    Args:
        num_embeddings: padded vocabulary size (divisible by the TP size).
        embedding_dim: hidden size d.
        vocab_size: true vocabulary size (<= num_embeddings); padding rows are initialised to zero,
            and the random rows do not depend on the amount of padding. Defaults to num_embeddings.
        init_std, seed, layer_number, tag: deterministic init (master tensor ``<tag>.weight``).

    weight: [num_embeddings/p, d], rows [r*V/p, (r+1)*V/p) on rank r.
    forward: input_ids [...] long -> [..., d] (replicated; all-reduce of the masked local lookups). An id
    outside ``[0, vocab_size)`` is refused (:func:`~.utils.check_token_ids`), at every TP size.
    ``sequence_parallel``: input_ids [b, s] -> [b, s/p, d] (reduce-scatter along the sequence instead).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, vocab_size: Optional[int] = None,
                 init_std: float = 0.02, seed: int = 1234, layer_number: int = 0,
                 tag: str = "embedding.word_embeddings", params_dtype: torch.dtype = torch.float32, device=None,
                 sequence_parallel: bool = False):
        super().__init__()
        self.sequence_parallel = sequence_parallel
        world = parallel_state.get_tensor_model_parallel_world_size()
        rank = parallel_state.get_tensor_model_parallel_rank()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.vocab_size = num_embeddings if vocab_size is None else vocab_size
        if self.vocab_size > num_embeddings:
            raise ValueError(f"vocab_size ({self.vocab_size}) exceeds the padded size ({num_embeddings})")
        self.vocab_start_index, self.vocab_end_index = VocabUtility.vocab_range_from_global_vocab_size(
            num_embeddings, rank, world)
        local = self.vocab_end_index - self.vocab_start_index
        self.weight = nn.Parameter(torch.empty(local, embedding_dim, dtype=params_dtype, device=device))
        set_tensor_model_parallel_attributes(self.weight, True, 0)
        init_partitioned_(self.weight, (num_embeddings, embedding_dim), init_std, seed, layer_number,
                          f"{tag}.weight", valid_rows=self.vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # an id outside the vocabulary would be a zero embedding at TP > 1 (no rank owns it): refused
        check_token_ids(input_ids, self.vocab_size, "the embedding")
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            outside = (input_ids < self.vocab_start_index) | (input_ids >= self.vocab_end_index)
            local_ids = (input_ids - self.vocab_start_index).masked_fill(outside, 0)
            out = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        else:
            out = F.embedding(input_ids, self.weight)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(out)
        return reduce_from_tensor_model_parallel_region(out)


def parallel_lm_logits(hidden: torch.Tensor, word_embeddings: VocabParallelEmbedding,
                       sequence_parallel: bool = False) -> torch.Tensor:
    """Tied output layer: [..., d] replicated -> vocab-parallel logits [..., V/p].

    ``sequence_parallel``: hidden [b, s/p, d] is all-gathered along the sequence first (backward:
    reduce-scatter, which also sums the per-vocabulary-block input gradients).

    The input gradient is all-reduced (each rank sees only its vocabulary block). Logits of padding
    entries (ids >= true vocab size) are set to -inf so they never take probability mass; the
    function then does not depend on the amount of padding (i.e. on TP).
    """
    if sequence_parallel:
        hidden = gather_from_sequence_parallel_region(hidden)
    else:
        hidden = copy_to_tensor_model_parallel_region(hidden)
    logits = F.linear(hidden, word_embeddings.weight)
    first_pad = word_embeddings.vocab_size - word_embeddings.vocab_start_index
    local = word_embeddings.vocab_end_index - word_embeddings.vocab_start_index
    if first_pad < local:
        pad = torch.arange(local, device=logits.device) >= max(first_pad, 0)
        # in place: the logits are F.linear's fresh output, which its backward does not need (an
        # out-of-place masked_fill would hold a second [..., V/p] copy)
        logits.masked_fill_(pad, float("-inf"))
    return logits


class _LinearFromSequenceParallelRegion(torch.autograd.Function):
    """Y_i = all_gather_seq(X) W_iᵀ (+ b_i), keeping only this rank's sequence chunk of X for backward.

    Backward all-gathers X again for the weight gradients and reduce-scatters the input gradient along
    the sequence (Megatron's sequence-parallel linear): the saved input is [b, s/p, d], not [b, s, d],
    for one more all-gather per backward.
    """

    #: forward's arguments before the weights (x, num_weights): W_i's ``needs_input_grad`` index is this + i
    WEIGHTS_START = 2

    @staticmethod
    def forward(ctx, x, num_weights, *params):
        weights, biases = params[:num_weights], params[num_weights:]
        full = _all_gather_seq(x)
        outs = [F.linear(full, w, b if biases else None) for w, b in zip(weights, biases or [None] * num_weights)]
        ctx.num_weights, ctx.has_bias = num_weights, bool(biases)
        ctx.save_for_backward(x, *weights)
        return tuple(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        saved = ctx.saved_tensors  # once: recomputation (torch.utils.checkpoint) allows one unpack
        x, weights = saved[0], saved[1:]
        full = _all_gather_seq(x)
        flat_input = full.reshape(-1, full.shape[-1])
        grad_input, grad_weights, grad_biases = None, [], []
        for i, (w, g) in enumerate(zip(weights, grads)):
            if g is None:
                grad_weights.append(None)
                grad_biases.append(None)
                continue
            term = g.matmul(w)
            grad_input = term if grad_input is None else grad_input.add_(term)
            flat_grad = g.reshape(-1, g.shape[-1])
            wants_grad = ctx.needs_input_grad[_LinearFromSequenceParallelRegion.WEIGHTS_START + i]
            grad_weights.append(flat_grad.t().matmul(flat_input) if wants_grad else None)
            grad_biases.append(flat_grad.sum(dim=0) if ctx.has_bias else None)
        if grad_input is None:
            grad_input = torch.zeros_like(full)
        grad_x = _reduce_scatter_seq(grad_input)
        return (grad_x, None, *grad_weights, *(grad_biases if ctx.has_bias else ()))


def linear_from_sequence_parallel_region(x: torch.Tensor, weights: Sequence[torch.Tensor],
                                         biases: Optional[Sequence[torch.Tensor]] = None) -> List[torch.Tensor]:
    """Several linear maps of the sequence-gathered input, as ``F.linear(gather_from_sequence_parallel_region(x),
    W_i, b_i)`` but saving only the local chunk of x (all-gathered again in backward).

    x: [b, s/p, d_in] (this rank's sequence chunk); weights: W_i [out_i, d_in]; biases: b_i [out_i] or None
    -> Y_i [b, s, out_i]. Backward: the input gradient is reduce-scattered along the sequence (the sum of
    every rank's partial, as gather_from_sequence_parallel_region's backward).
    """
    weights = list(weights)
    biases = list(biases) if biases is not None else []
    if biases and len(biases) != len(weights):
        raise ValueError(f"linear_from_sequence_parallel_region: {len(weights)} weights but {len(biases)} biases")
    return list(_LinearFromSequenceParallelRegion.apply(x, len(weights), *weights, *biases))


class ColumnParallelLinear(nn.Module):
    """Y = X Aᵀ + b with A's output rows split over the TP group (weight [out/p, in], bias [out/p]).

    forward: x [..., in] replicated -> [..., out/p] (or [..., out] with ``gather_output``).
    ``copy_input=False`` skips the input gradient all-reduce (when the caller handles it).
    ``sequence_parallel``: where the input would be copied it is all-gathered along the sequence
    ([b, s/p, in] -> [b, s, in]; backward reduce-scatter).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, gather_output: bool = False,
                 init_std: float = 0.02, seed: int = 1234, layer_number: int = 0, tag: str = "linear",
                 copy_input: bool = True, params_dtype: torch.dtype = torch.float32, device=None,
                 sequence_parallel: bool = False):
        super().__init__()
        world = parallel_state.get_tensor_model_parallel_world_size()
        self.in_features, self.out_features = in_features, out_features
        self.sequence_parallel = sequence_parallel
        self.output_size_per_partition = divide(out_features, world, f"{tag}: output size")
        self.gather_output, self.copy_input = gather_output, copy_input
        self.weight = nn.Parameter(torch.empty(self.output_size_per_partition, in_features, dtype=params_dtype,
                                               device=device))
        set_tensor_model_parallel_attributes(self.weight, True, 0)
        init_partitioned_(self.weight, (out_features, in_features), init_std, seed, layer_number, f"{tag}.weight")
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.output_size_per_partition, dtype=params_dtype, device=device))
            set_tensor_model_parallel_attributes(self.bias, True, 0)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.copy_input and self.sequence_parallel:
            (out,) = linear_from_sequence_parallel_region(x, [self.weight], None if self.bias is None else [self.bias])
        else:
            if self.copy_input:
                x = copy_to_tensor_model_parallel_region(x)
            out = F.linear(x, self.weight, self.bias)
        if self.gather_output:
            out = gather_from_tensor_model_parallel_region(out)
        return out


class RowParallelLinear(nn.Module):
    """Y = X Aᵀ + b with A's input columns split over the TP group (weight [out, in/p], bias [out] replicated).

    forward: x [..., in/p] (``input_is_parallel``) or [..., in] replicated -> [..., out] replicated
    (all-reduce of the partial products, then the bias).
    ``sequence_parallel``: reduce-scatter along the sequence instead of the all-reduce ([b, s/p, out]);
    the replicated bias then sees this rank's rows only, so its gradient is all-reduced over the TP group.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, input_is_parallel: bool = True,
                 init_std: float = 0.02, seed: int = 1234, layer_number: int = 0, tag: str = "linear",
                 params_dtype: torch.dtype = torch.float32, device=None, sequence_parallel: bool = False):
        super().__init__()
        world = parallel_state.get_tensor_model_parallel_world_size()
        self.in_features, self.out_features = in_features, out_features
        self.sequence_parallel = sequence_parallel
        self.input_size_per_partition = divide(in_features, world, f"{tag}: input size")
        self.input_is_parallel = input_is_parallel
        self.weight = nn.Parameter(torch.empty(out_features, self.input_size_per_partition, dtype=params_dtype,
                                               device=device))
        set_tensor_model_parallel_attributes(self.weight, True, 1)
        init_partitioned_(self.weight, (out_features, in_features), init_std, seed, layer_number, f"{tag}.weight",
                          partition_dim=1)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=params_dtype, device=device))
            set_tensor_model_parallel_attributes(self.bias, False, 0)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tensor_model_parallel_region(x)
        if self.sequence_parallel:
            out = reduce_scatter_to_sequence_parallel_region(F.linear(x, self.weight))
            return out if self.bias is None else out + copy_to_tensor_model_parallel_region(self.bias)
        out = reduce_from_tensor_model_parallel_region(F.linear(x, self.weight))
        if self.bias is not None:
            out = out + self.bias
        return out
