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
:meth:`ParallelAttention.core_attention` in backward.

Incremental decoding (``interop/generation.py``): ``forward(x, kv_cache=cache)`` takes the new positions
only, rotates them at their absolute positions and attends over the cached keys and values of the
earlier ones, appending the new keys and values to the :class:`KVCache` in place. Pattention keeps no
per-sequence state, so nothing else is cached; the projections and their collectives are the same.
Context parallel: the core attends over the whole sequence split over the context-parallel ranks
(:mod:`megatron_tokenformer.model.context_parallel`; not with a KV cache: generation runs without CP).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from megatron_tokenformer import parallel_state
from megatron_tokenformer.config import ModelConfig
from megatron_tokenformer.model.context_parallel import context_parallel_attention
from megatron_tokenformer.model.recompute import checkpointed
from megatron_tokenformer.model.rotary import RotaryEmbedding, apply_rotary_pos_emb
from megatron_tokenformer.model.sequence_parallel import sequence_parallel_enabled
from megatron_tokenformer.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_scatter_to_tensor_model_parallel_region,
)
from megatron_tokenformer.tensor_parallel.pattention import ParallelPattention, parallel_pattention_partial_outputs
from megatron_tokenformer.tensor_parallel.utils import divide


@dataclass
class KVCache:
    """Keys and values of the positions already processed, per layer, for incremental decoding.

    ``keys[i]``, ``values[i]``: layer i's (0-based: ``layer_number - 1``) keys (rotated) and values of this
    rank's heads, [b, h/p, t, head_dim], or None before the first step. :meth:`ParallelAttention.forward`
    appends to them in place; layer i's new positions start at ``length(i)``.
    """

    keys: List[Optional[torch.Tensor]]
    values: List[Optional[torch.Tensor]]

    @classmethod
    def empty(cls, num_layers: int) -> "KVCache":
        return cls([None] * num_layers, [None] * num_layers)

    def length(self, layer: int) -> int:
        """Positions cached for ``layer`` (0-based)."""
        return 0 if self.keys[layer] is None else self.keys[layer].shape[2]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Add k, v [b, h/p, s, head_dim] after ``layer``'s cached positions; returns all of them
        [b, h/p, t + s, head_dim]."""
        if self.keys[layer] is not None:
            k, v = torch.cat([self.keys[layer], k], dim=2), torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class ParallelAttention(nn.Module):
    """Base class: causal attention over this rank's heads. forward: [b, s, d] -> [b, s, d] (optionally
    over a :class:`KVCache` of earlier positions)."""

    def __init__(self, config: ModelConfig, layer_number: int):
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

    def core_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       kv_cache: Optional[KVCache] = None) -> torch.Tensor:
        """q, k, v: [b, s, d/p] (local heads) -> context [b, s, d/p].

        With ``kv_cache`` the s positions follow the ``kv_cache.length(layer)`` cached ones: they are rotated
        at their absolute positions, appended to the cache, and attend to every cached position and to
        the new ones up to their own.
        """
        b, s, _ = q.shape
        shape = (b, s, self.num_heads_per_partition, self.head_dim)
        q, k, v = q.reshape(shape), k.reshape(shape), v.reshape(shape)
        if parallel_state.get_context_parallel_world_size() > 1:  # the sequence is split over ranks
            return context_parallel_attention(q, k, v, self.rotary_emb).reshape(b, s, self.hidden_size_per_partition)
        layer = self.layer_number - 1
        past = 0 if kv_cache is None else kv_cache.length(layer)
        if self.rotary_emb is not None:
            cos, sin = self.rotary_emb(past + s, device=q.device)
            cos, sin = cos[past:], sin[past:]
            q, k = apply_rotary_pos_emb(q, cos, sin), apply_rotary_pos_emb(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.append(layer, k, v)
        if past == 0:
            context = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # new position past + i sees keys 0 .. past + i
            positions = torch.arange(past, past + s, device=q.device)
            mask = torch.arange(past + s, device=q.device)[None, :] <= positions[:, None]
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return context.transpose(1, 2).reshape(b, s, self.hidden_size_per_partition)

    def forward(self, x: torch.Tensor, kv_cache: Optional[KVCache] = None) -> torch.Tensor:
        """x [b, s, d] -> [b, s, d]. ``kv_cache``: see :meth:`core_attention` (then not recomputed:
        the cache is appended to once)."""
        q, k, v = self.project_qkv(x)
        if kv_cache is not None:
            return self.project_output(self.core_attention(q, k, v, kv_cache))
        if self.selective_recompute:
            return self.project_output(checkpointed(self.core_attention, q, k, v))
        return self.project_output(self.core_attention(q, k, v))


class TokenformerAttention(ParallelAttention):
    """Attention whose Q/K/V/O projections are parallel Pattentions.

    Parameters: ``query``, ``key``, ``value`` (n = qkv_num_param_tokens, tau = qkv_tau) and ``dense``
    (n = proj_num_param_tokens, tau = proj_tau), each with ``key_param_tokens`` [n/p, d] and
    ``value_param_tokens`` [n/p, d].
    """

    def __init__(self, config: ModelConfig, layer_number: int, seed: int = 1234):
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
