"""Model code: the drop-in Pattention, attention (with its KV cache), the Tokenformer and baseline GPT
blocks, the language model of both (GPTModel, first named TokenformerLM), pipeline layer specs, the
model-family specs (model/spec.py) and canonical parameter names (model/naming.py)."""

from megatron_tokenformer.model.attention import KVCache
from megatron_tokenformer.model.language_model import (
                                                       GPTModel,
                                                       LanguageModelEmbedding,
                                                       TokenformerEmbedding,
                                                       TokenformerLM,
                                                       language_model_loss,
)
from megatron_tokenformer.model.pattention import Pattention, normalize_pattention_scores
from megatron_tokenformer.model.pipeline import get_layer_specs
from megatron_tokenformer.model.spec import config_parameter_counts, get_spec

__all__ = ["GPTModel", "KVCache", "LanguageModelEmbedding", "Pattention", "TokenformerEmbedding", "TokenformerLM",
           "config_parameter_counts", "get_layer_specs", "get_spec", "language_model_loss",
           "normalize_pattention_scores"]
