"""Model code: the drop-in Pattention, attention, the Tokenformer block and LM, pipeline layer specs."""

from megatron_tokenformer.model.pattention import Pattention, normalize_pattention_scores  # noqa: I001 (first)
from megatron_tokenformer.model.language_model import TokenformerLM, language_model_loss

__all__ = ["Pattention", "normalize_pattention_scores", "TokenformerLM", "language_model_loss"]
