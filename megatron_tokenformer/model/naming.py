"""Canonical parameter names: the same name for a parameter at every parallel layout.

The canonical name is the name in the PP = 1 model (:class:`~megatron_tokenformer.model.GPTModel`):
``embedding.word_embeddings.weight``, ``layers.{i}.attention.query.key_param_tokens``, ...,
``final_layernorm.weight``. With TP the shapes differ but the names do not. With PP > 1 DeepSpeed's
``PipelineModule`` names parameters by layer index (``3.mlp.key_param_tokens``) or tied key
(``tied_modules.embed.word_embeddings.weight``); :func:`canonical_parameter_names` maps them back
using the layer objects: a layer may declare ``canonical_prefix`` (str), otherwise a
model family's block (:mod:`~megatron_tokenformer.model.spec`) maps to ``layers.{layer_number - 1}.``, the embedding
to ``embedding.`` and a final LayerNorm to ``final_layernorm.``.
"""

from __future__ import annotations

from typing import Dict, Set

import torch

from megatron_tokenformer.model.language_model import LanguageModelEmbedding
from megatron_tokenformer.model.layernorm import LayerNorm
from megatron_tokenformer.model.spec import MODEL_SPECS
from megatron_tokenformer.tensor_parallel.layers import VocabParallelEmbedding

__all__ = ["canonical_parameter_names", "vocab_parameters", "layer_prefix"]


def layer_prefix(layer: torch.nn.Module, where: str) -> str:
    """Canonical name prefix (ending with '.') of a pipeline layer object."""
    prefix = getattr(layer, "canonical_prefix", None)
    if isinstance(prefix, str):
        return prefix if prefix.endswith(".") or prefix == "" else prefix + "."
    if isinstance(layer, tuple(spec.block_class for spec in MODEL_SPECS.values())):
        return f"layers.{layer.layer_number - 1}."
    if isinstance(layer, LanguageModelEmbedding):
        return "embedding."
    if isinstance(layer, LayerNorm):
        return "final_layernorm."
    raise ValueError(f"pipeline layer {where} ({type(layer).__name__}) has no canonical checkpoint name; give it a "
                     "`canonical_prefix` attribute")


def _is_pipeline_module(module: torch.nn.Module) -> bool:
    try:
        from deepspeed.pipe import PipelineModule
    except ImportError:  # pragma: no cover - deepspeed is a dependency
        return False
    return isinstance(module, PipelineModule)


def canonical_parameter_names(module: torch.nn.Module) -> Dict[str, str]:
    """``{local parameter name: canonical name}`` for a GPTModel or a PipelineModule stage."""
    if not _is_pipeline_module(module):
        return {name: name for name, _ in module.named_parameters()}
    out: Dict[str, str] = {}
    for name, _ in module.named_parameters():
        head, _, rest = name.partition(".")
        if head == "tied_modules":
            key, _, rest = rest.partition(".")
            layer = module.tied_modules[key]
            out[name] = layer_prefix(layer, f"tied:{key}") + rest
        else:
            layer = module._modules.get(head)
            if layer is None:
                raise ValueError(f"pipeline parameter {name}: no layer {head!r}")
            # a layer may itself be a wrapper whose parameters sit under a sub-name
            out[name] = layer_prefix(layer, head) + rest
    inverse: Dict[str, str] = {}
    for local, canon in out.items():
        if canon in inverse:
            raise ValueError(f"parameters {inverse[canon]} and {local} map to the same canonical name {canon}")
        inverse[canon] = local
    return out


def vocab_parameters(module: torch.nn.Module) -> Set[int]:
    """ids of parameters whose dim-0 rows are the (padded) vocabulary."""
    return {id(m.weight) for m in module.modules() if isinstance(m, VocabParallelEmbedding)}
