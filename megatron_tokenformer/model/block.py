"""The Tokenformer block (docs/design.md §2): pre-norm attention and a single-Pattention FFN."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megatron_tokenformer.config import ModelConfig
from megatron_tokenformer.model.attention import KVCache, TokenformerAttention
from megatron_tokenformer.model.layernorm import LayerNorm
from megatron_tokenformer.model.sequence_parallel import sequence_parallel_enabled
from megatron_tokenformer.tensor_parallel.pattention import ParallelPattention


class TokenformerBlock(nn.Module):
    """X = X + Attention(LN(X)); X = X + FFN(LN(X)), FFN = one Pattention d -> d (no other activation).

    layer_number: 1-based (seeds the parameter init; layer ``layers.{i}`` has layer_number i + 1).
    Submodules: ``input_layernorm``, ``attention`` (query/key/value/dense), ``post_attention_layernorm``,
    ``mlp`` (a ParallelPattention with n = ffn_num_param_tokens, tau = ffn_tau).
    forward: hidden [b, s, d] (replicated on the TP group) -> [b, s, d]; sequence parallel:
    [b, s/p, d] (this rank's sequence chunk) -> [b, s/p, d].
    """

    def __init__(self, config: ModelConfig, layer_number: int, seed: int = 1234):
        super().__init__()
        d = config.hidden_size
        dtype = config.torch_dtype
        parametric = config.block_layernorm == "parametric"
        sp = sequence_parallel_enabled(config)
        self.layer_number = layer_number
        self.input_layernorm = LayerNorm(d, config.layernorm_epsilon, parametric, params_dtype=dtype,
                                         sequence_parallel=sp)
        self.attention = TokenformerAttention(config, layer_number, seed)
        self.post_attention_layernorm = LayerNorm(d, config.layernorm_epsilon, parametric, params_dtype=dtype,
                                                  sequence_parallel=sp)
        self.mlp = ParallelPattention(d, d, config.ffn_num_param_tokens, normalization=config.pattention_normalization,
                                      tau=config.ffn_tau, eps=config.norm_epsilon_pattention,
                                      key_init_std=config.init_method_std, value_init_std=config.value_init_std(),
                                      seed=seed, layer_number=layer_number, tag="mlp", copy_input=True,
                                      reduce_output=True, params_dtype=dtype, sequence_parallel=sp,
                                      fused_norm=config.fused_pattention_norm)

    def forward(self, hidden_states: torch.Tensor, kv_cache: Optional[KVCache] = None) -> torch.Tensor:
        """``kv_cache``: the attention's keys and values of earlier positions (incremental decoding;
        :class:`~megatron_tokenformer.model.attention.KVCache`, appended to in place)."""
        hidden_states = hidden_states + self.attention(self.input_layernorm(hidden_states), kv_cache)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
