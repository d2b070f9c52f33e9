"""Model code: the drop-in Pattention, attention, the Tokenformer block and LM, pipeline layer specs."""

from megatron_tokenformer.model.language_model import TokenformerLM, language_model_loss
from megatron_tokenformer.model.parameters import count_parameters
from megatron_tokenformer.model.pattention import Pattention, normalize_pattention_scores
from megatron_tokenformer.model.pipeline import get_layer_specs

__all__ = ["Pattention", "TokenformerLM", "count_parameters", "get_layer_specs", "language_model_loss",
           "normalize_pattention_scores"]
