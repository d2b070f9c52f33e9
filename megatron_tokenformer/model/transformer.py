"""The baseline: a standard pre-norm GPT block with Megatron's column/row-parallel linear layers.

Selected with ``model_type="transformer"`` (``--model-type transformer``). It shares everything but
the block with the Tokenformer: the vocab-parallel tied embedding, the token-token attention
(:class:`~megatron_tokenformer.model.attention.ParallelAttention`: rotary on a fraction of each head,
causal SDPA on the rank's own heads), the final LayerNorm, the loss, the pipeline layer specs, the
checkpoint and resharding code and the training loop. Only the projections differ::

    X = X + Dense(Attention(Q(LN1(X)), K(LN1(X)), V(LN1(X))))
    X = X + W2 GeLU(W1 LN2(X) + b1) + b2

Tensor parallelism (Megatron's layout, p ranks, h heads, f = ffn_hidden_size):

* ``attention.query`` / ``.key`` / ``.value``: column-parallel [d, d] each, rows head-major, so
  rank r holds the rows of heads [r h/p, (r+1) h/p): the Q/K/V of its own heads, no communication.
  The three share one input-gradient all-reduce and run as one GEMM. Keeping three tensors (not one
  interleaved [3d, d]) makes every stored tensor a plain concatenation of its TP shards, which is
  what the resharding and growth tools assume.
* ``attention.dense``: row-parallel [d, d/p] + replicated bias, all-reduce of the output.
* ``mlp.dense_h_to_4h``: column-parallel [f/p, d] + [f/p] bias; exact (erf) GeLU on the local slice;
  ``mlp.dense_4h_to_h``: row-parallel [d, f/p] + replicated bias, all-reduce of the output.

Forward traffic per block: two all-reduces of [b, s, d] (Megatron's 4 T·d per rank in ring units).

Init (deterministic, independent of TP/PP, as the rest of the project): every weight's full master
tensor comes from its own generator seeded by (seed, layer number, tag) and each rank keeps its
slice. Input projections (Q/K/V, ``dense_h_to_4h``) ~ N(0, init_method_std²); output projections
(``attention.dense``, ``dense_4h_to_h``) ~ N(0, value_init_std()²) -- the "wang" init
2 / (L sqrt(d)) by default, as the official Tokenformer repository's transformer configs
(``output_layer_init_method: wang_init``); biases zero; LayerNorm weight one, bias zero.
Block LayerNorms follow ``config.block_layernorm``; use ``"parametric"`` for a standard GPT
(:func:`transformer_config` and ``--model-type transformer`` do).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from megatron_tokenformer.config import MODEL_FAMILY_FIELDS, ModelConfig
from megatron_tokenformer.model.attention import KVCache, ParallelAttention
from megatron_tokenformer.model.layernorm import LayerNorm
from megatron_tokenformer.model.sequence_parallel import sequence_parallel_enabled
from megatron_tokenformer.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    linear_from_sequence_parallel_region,
)

__all__ = ["TransformerAttention", "ParallelMLP", "TransformerBlock", "transformer_config"]

#: the ``model_type`` of this family (its spec, ``model/spec.py``, names this module's block)
MODEL_TYPE = "transformer"


def transformer_config(**kwargs) -> ModelConfig:
    """A :class:`ModelConfig` for the baseline GPT: ``model_type="transformer"``, parametric
    block LayerNorms and ``ffn_hidden_size = 4 * hidden_size`` unless given. The Pattention token
    counts are unused by this model; they default to ``hidden_size`` (the config requires them)."""
    kwargs.setdefault("model_type", MODEL_TYPE)
    for name, value in MODEL_FAMILY_FIELDS[MODEL_TYPE].recommended.items():
        kwargs.setdefault(name, value)  # parametric block LayerNorms
    for name in ("qkv_num_param_tokens", "proj_num_param_tokens"):
        kwargs.setdefault(name, kwargs["hidden_size"])
    kwargs.setdefault("ffn_num_param_tokens", 4 * kwargs["hidden_size"])
    return ModelConfig(**kwargs)


class TransformerAttention(ParallelAttention):
    """Causal self-attention with linear projections.

    Parameters: ``query``/``key``/``value`` (:class:`ColumnParallelLinear`, weight [d/p, d], bias
    [d/p]) and ``dense`` (:class:`RowParallelLinear`, weight [d, d/p], bias [d] replicated).
    forward: [b, s, d] replicated -> [b, s, d] replicated.
    """

    def __init__(self, config: ModelConfig, layer_number: int, seed: int = 1234):
        super().__init__(config, layer_number)
        d = config.hidden_size
        common = dict(seed=seed, layer_number=layer_number, params_dtype=config.torch_dtype)
        for name in ("query", "key", "value"):
            setattr(self, name, ColumnParallelLinear(d, d, bias=True, init_std=config.init_method_std,
                                                     tag=f"attention.{name}", copy_input=False, **common))
        self.dense = RowParallelLinear(d, d, bias=True, input_is_parallel=True, init_std=config.value_init_std(),
                                       tag="attention.dense", sequence_parallel=self.sequence_parallel, **common)

    def project_qkv(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [b, s, d] -> q, k, v [b, s, d/p] each (this rank's heads, head-major channels)."""
        layers = (self.query, self.key, self.value)
        weight = torch.cat([layer.weight for layer in layers], dim=0)
        bias = torch.cat([layer.bias for layer in layers], dim=0)
        if self.sequence_parallel:  # gathered inside, only the local chunk kept for backward
            (qkv,) = linear_from_sequence_parallel_region(x, [weight], [bias])
        else:  # one input-gradient all-reduce for Q, K and V
            qkv = F.linear(self.replicate_input(x), weight, bias)
        q, k, v = qkv.split(self.hidden_size_per_partition, dim=-1)
        return q, k, v

    def project_output(self, context: torch.Tensor) -> torch.Tensor:
        """context [b, s, d/p] (local heads) -> [b, s, d] (all-reduced, plus the bias)."""
        return self.dense(context)


class ParallelMLP(nn.Module):
    """GeLU MLP d -> f -> d: ``dense_h_to_4h`` column-parallel, ``dense_4h_to_h`` row-parallel.

    forward: [b, s, d] replicated -> [b, s, d] replicated (one all-reduce).
    """

    def __init__(self, config: ModelConfig, layer_number: int, seed: int = 1234):
        super().__init__()
        d, f = config.hidden_size, config.ffn_hidden_size
        common = dict(seed=seed, layer_number=layer_number, params_dtype=config.torch_dtype,
                      sequence_parallel=sequence_parallel_enabled(config))
        self.dense_h_to_4h = ColumnParallelLinear(d, f, bias=True, init_std=config.init_method_std,
                                                  tag="mlp.dense_h_to_4h", copy_input=True, **common)
        self.dense_4h_to_h = RowParallelLinear(f, d, bias=True, input_is_parallel=True,
                                               init_std=config.value_init_std(), tag="mlp.dense_4h_to_h", **common)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(hidden_states)))


class TransformerBlock(nn.Module):
    """X = X + Attention(LN(X)); X = X + MLP(LN(X)) (pre-norm GPT block).

    layer_number: 1-based (seeds the init; layer ``layers.{i}`` has layer_number i + 1).
    Submodules: ``input_layernorm``, ``attention`` (query/key/value/dense), ``post_attention_layernorm``,
    ``mlp`` (dense_h_to_4h/dense_4h_to_h) -- the same names as the Tokenformer block where the
    concepts coincide. forward: hidden [b, s, d] (replicated on the TP group) -> [b, s, d].
    """

    def __init__(self, config: ModelConfig, layer_number: int, seed: int = 1234):
        super().__init__()
        d, dtype = config.hidden_size, config.torch_dtype
        parametric = config.block_layernorm == "parametric"
        self.layer_number = layer_number
        sp = sequence_parallel_enabled(config)
        self.input_layernorm = LayerNorm(d, config.layernorm_epsilon, parametric, params_dtype=dtype,
                                         sequence_parallel=sp)
        self.attention = TransformerAttention(config, layer_number, seed)
        self.post_attention_layernorm = LayerNorm(d, config.layernorm_epsilon, parametric, params_dtype=dtype,
                                                  sequence_parallel=sp)
        self.mlp = ParallelMLP(config, layer_number, seed)

    @property
    def canonical_prefix(self) -> str:
        """Checkpoint name prefix of this block at any pipeline layout (see model/naming.py)."""
        return f"layers.{self.layer_number - 1}."

    def forward(self, hidden_states: torch.Tensor, kv_cache: Optional[KVCache] = None) -> torch.Tensor:
        """``kv_cache``: the attention's keys and values of earlier positions (incremental decoding;
        :class:`~megatron_tokenformer.model.attention.KVCache`, appended to in place)."""
        hidden_states = hidden_states + self.attention(self.input_layernorm(hidden_states), kv_cache)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
