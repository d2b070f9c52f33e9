"""Causal multi-head self-attention on the tensor-parallel rank's own heads.

:class:`ParallelAttention` does the token-token part (head split, rotary on a fraction of each head,
causal ``scaled_dot_product_attention``) and leaves the projections to subclasses, so the Tokenformer
(Pattention projections) and a baseline transformer (column/row-parallel linear projections) share it:

- ``project_qkv(x [b, s, d] replicated) -> q, k, v`` each [b, s, d/p]: the rank's heads, head-major
  channels (rank r holds heads [r*h/p, (r+1)*h/p)).
- ``project_output(context [b, s, d/p]) -> [b, s, d]`` replicated.

:class:`TokenformerAttention`: Q, K, V, O are Pattentions with partitioned parameter tokens. Q/K/V
read the replicated input (one gradient all-reduce for the three), their norm statistics travel in
one all-reduce, and their partial sums [b, s, 3, d] are reduce-scattered in ONE collective into the
rank's heads. The attention output is all-gathered to [b, s, d] (backward: reduce-scatter, since the
output Pattention's input gradient is a per-rank partial) and the output Pattention ends in an
all-reduce.

Sequence parallel (:mod:`megatron_tokenformer.model.sequence_parallel`): the input is [b, s/p, d] and
is all-gathered along the sequence instead of copied (backward: reduce-scatter instead of the
all-reduce), and the output projection reduce-scatters along the sequence instead of all-reducing
(output [b, s/p, d]). Selective recomputation (``recompute_granularity="selective"``) recomputes
:meth:`ParallelAttention.core_attention` in backward. Context parallel: the core attends over the whole
sequence split over the context-parallel ranks (:mod:`megatron_tokenformer.model.context_parallel`).
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from megatron_tokenformer import parallel_state
from megatron_tokenformer.config import TokenformerConfig
from megatron_tokenformer.model.context_parallel import context_parallel_attention
from megatron_tokenformer.model.recompute import checkpointed
from megatron_tokenformer.model.rotary import RotaryEmbedding, apply_rotary_pos_emb
from megatron_tokenformer.model.sequence_parallel import sequence_parallel_enabled
from megatron_tokenformer.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                           gather_from_tensor_model_parallel_region,
                                                           reduce_scatter_to_tensor_model_parallel_region)
from megatron_tokenformer.tensor_parallel.pattention import ParallelPattention, parallel_pattention_partial_outputs
from megatron_tokenformer.tensor_parallel.utils import divide


class ParallelAttention(nn.Module):
    """Base class: causal attention over this rank's heads. forward: [b, s, d] -> [b, s, d]."""

    def __init__(self, config: TokenformerConfig, layer_number: int):
        super().__init__()
        world = parallel_state.get_tensor_model_parallel_world_size()
        self.hidden_size = config.hidden_size
        self.num_attention_heads = config.num_attention_heads
        self.head_dim = divide(config.hidden_size, config.num_attention_heads, "hidden_size")
        self.num_heads_per_partition = divide(config.num_attention_heads, world,
                                              "num_attention_heads (tensor-model-parallel size)")
        self.hidden_size_per_partition = self.num_heads_per_partition * self.head_dim
        self.layer_number = layer_number
        self.rotary_emb = RotaryEmbedding(config.rotary_dim, config.rotary_base) if config.rotary_dim > 0 else None
        self.sequence_parallel = sequence_parallel_enabled(config)
        self.selective_recompute = getattr(config, "recompute_granularity", None) == "selective"

    def replicate_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input of the Q/K/V projections without sequence parallelism, once for the three: [b, s, d]
        replicated, its gradient all-reduced (copy). With sequence parallelism the projections gather
        [b, s/p, d] along the sequence themselves (``linear_from_sequence_parallel_region``: only the
        local chunk is kept for backward)."""
        return copy_to_tensor_model_parallel_region(x)

    def project_qkv(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def project_output(self, context: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def core_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: [b, s, d/p] (local heads) -> context [b, s, d/p]."""
        b, s, _ = q.shape
        shape = (b, s, self.num_heads_per_partition, self.head_dim)
        q, k, v = q.reshape(shape), k.reshape(shape), v.reshape(shape)
        if parallel_state.get_context_parallel_world_size() > 1:  # the sequence is split over ranks
            return context_parallel_attention(q, k, v, self.rotary_emb).reshape(b, s, self.hidden_size_per_partition)
        if self.rotary_emb is not None:
            cos, sin = self.rotary_emb(s, device=q.device)
            q, k = apply_rotary_pos_emb(q, cos, sin), apply_rotary_pos_emb(k, cos, sin)
        context = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=True)
        return context.transpose(1, 2).reshape(b, s, self.hidden_size_per_partition)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.project_qkv(x)
        if self.selective_recompute:
            return self.project_output(checkpointed(self.core_attention, q, k, v))
        return self.project_output(self.core_attention(q, k, v))


class TokenformerAttention(ParallelAttention):
    """Attention whose Q/K/V/O projections are parallel Pattentions.

    Parameters: ``query``, ``key``, ``value`` (n = qkv_num_param_tokens, tau = qkv_tau) and ``dense``
    (n = proj_num_param_tokens, tau = proj_tau), each with ``key_param_tokens`` [n/p, d] and
    ``value_param_tokens`` [n/p, d].
    """

    def __init__(self, config: TokenformerConfig, layer_number: int, seed: int = 1234):
        super().__init__(config, layer_number)
        d = config.hidden_size
        dtype = config.torch_dtype
        common = dict(normalization=config.pattention_normalization, eps=config.norm_epsilon_pattention,
                      key_init_std=config.init_method_std, value_init_std=config.value_init_std(), seed=seed,
                      layer_number=layer_number, params_dtype=dtype,
                      fused_norm=config.fused_pattention_norm)
        for name in ("query", "key", "value"):
            setattr(self, name, ParallelPattention(d, d, config.qkv_num_param_tokens, tau=config.qkv_tau,
                                                   tag=f"attention.{name}", copy_input=False,
                                                   reduce_output=False, **common))
        self.dense = ParallelPattention(d, d, config.proj_num_param_tokens, tau=config.proj_tau,
                                        tag="attention.dense", copy_input=False, reduce_output=True,
                                        sequence_parallel=self.sequence_parallel, **common)

    def project_qkv(self, x):
        world = parallel_state.get_tensor_model_parallel_world_size()
        layers = [self.query, self.key, self.value]
        if self.sequence_parallel:  # gathered inside, only the local chunk kept for backward
            partials = parallel_pattention_partial_outputs(layers, x, sequence_parallel_input=True)
        else:
            partials = parallel_pattention_partial_outputs(layers, self.replicate_input(x))
        b, s, d = partials[0].shape
        # [b, s, 3, p, d/p] -> [b, s, p, 3, d/p]: block r of the last dim = (Q_r, K_r, V_r)
        stacked = torch.stack(partials, dim=2).reshape(b, s, 3, world, d // world).transpose(2, 3)
        local = reduce_scatter_to_tensor_model_parallel_region(stacked.reshape(b, s, 3 * d))
        q, k, v = local.reshape(b, s, 3, d // world).unbind(dim=2)
        return q, k, v

    def project_output(self, context):
        full = gather_from_tensor_model_parallel_region(context, output_grad_is_partial=True)
        return self.dense(full)
