"""Re-export: canonical parameter names are a model concern, see :mod:`megatron_tokenformer.model.naming`."""

from megatron_tokenformer.model.naming import canonical_parameter_names, layer_prefix, vocab_parameters  # noqa: F401

__all__ = ["canonical_parameter_names", "vocab_parameters", "layer_prefix"]
