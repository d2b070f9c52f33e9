"""Parameter counts of the Tokenformer LM, from the config (no model needed)."""

from __future__ import annotations

from typing import Dict

from megatron_tokenformer.config import TokenformerConfig


def count_parameters(config: TokenformerConfig, tensor_model_parallel_size: int = 1,
                     include_embedding: bool = True, include_padding: bool = False) -> Dict[str, int]:
    """Global (all TP ranks together) parameter counts by part.

    A Pattention d1 -> d2 with n tokens has n * (d1 + d2) parameters; per block: Q, K, V with
    qkv_num_param_tokens, the output projection with proj_num_param_tokens, the FFN with
    ffn_num_param_tokens (all d -> d), plus 4d for parametric block LayerNorms.
    The tied embedding counts once: vocab_size * d (padded_vocab_size(tp) * d with ``include_padding``).
    Returns {"embedding", "attention", "mlp", "layernorm", "total"} ("total" honours include_embedding).
    """
    d = config.hidden_size
    layers = config.num_layers
    attention = layers * 2 * d * (3 * config.qkv_num_param_tokens + config.proj_num_param_tokens)
    mlp = layers * 2 * d * config.ffn_num_param_tokens
    layernorm = 2 * d + (layers * 4 * d if config.block_layernorm == "parametric" else 0)
    vocab = config.padded_vocab_size(tensor_model_parallel_size) if include_padding else config.vocab_size
    embedding = vocab * d
    total = attention + mlp + layernorm + (embedding if include_embedding else 0)
    return {"embedding": embedding, "attention": attention, "mlp": mlp, "layernorm": layernorm, "total": total}
