"""Model code: the drop-in Pattention, attention, the Tokenformer block and LM, pipeline layer specs.

Exports are lazy: ``megatron_tokenformer.tensor_parallel`` imports ``model.pattention`` (the shared
normalisation math) while ``model.language_model`` imports ``tensor_parallel``; importing the
submodules on first use keeps both import orders working.
"""

_LAZY = {
    "Pattention": "megatron_tokenformer.model.pattention",
    "normalize_pattention_scores": "megatron_tokenformer.model.pattention",
    "TokenformerLM": "megatron_tokenformer.model.language_model",
    "language_model_loss": "megatron_tokenformer.model.language_model",
    "count_parameters": "megatron_tokenformer.model.parameters",
    "get_layer_specs": "megatron_tokenformer.model.pipeline",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'megatron_tokenformer.model' has no attribute {name!r}")


def __dir__():
    return __all__
