"""megatron_tokenformer: Megatron-style 3D-parallel pretraining for Tokenformer.

The public names are imported lazily so that ``import megatron_tokenformer`` stays cheap and does
not pull in DeepSpeed or torch.distributed state:

    from megatron_tokenformer import GPTModel, ModelConfig, Pattention

``GPTModel`` and ``ModelConfig`` build and describe every model family (the Tokenformer and the baseline
GPT); ``TokenformerLM`` and ``TokenformerConfig`` are the same objects under their first names.
"""

__version__ = "0.1.0"

_LAZY = {
    "GPTModel": "megatron_tokenformer.model.language_model",
    "LanguageModelEmbedding": "megatron_tokenformer.model.language_model",
    "ModelConfig": "megatron_tokenformer.config",
    "Pattention": "megatron_tokenformer.model.pattention",
    "TokenformerConfig": "megatron_tokenformer.config",
    "TokenformerEmbedding": "megatron_tokenformer.model.language_model",
    "TokenformerLM": "megatron_tokenformer.model.language_model",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'megatron_tokenformer' has no attribute {name!r}")


def __dir__():
    return __all__
