"""DeepSpeed pipeline layer specs for the language model (either family).

The layer sequence is exactly GPTModel's, with the same module classes and the same
(seed, layer number, tag)-based init, so a PipelineModule at any PP computes the same function from
the same initial weights as ``GPTModel(config, seed)``::

    TiedLayerSpec("embed", LanguageModelEmbedding)     input_ids -> hidden          (first stage)
    LayerSpec(TokenformerBlock, layer_number=i + 1)    hidden -> hidden             (x num_layers; the
                                                       family's block: TransformerBlock for the GPT)
    LayerSpec(LayerNorm, parametric)                   final LayerNorm
    TiedLayerSpec("embed", ..., forward_fn=logits)     hidden -> vocab-parallel logits (last stage)
    loss_fn = pipeline_loss_fn(logits, (labels, loss_mask))

Usage::

    PipelineModule(layers=get_layer_specs(config, seed), loss_fn=pipeline_loss_fn,
                   topology=parallel_state.get_topology(), partition_method="parameters")

Pipeline inputs: ``(input_ids,)`` or ``input_ids``; labels: ``(labels, loss_mask)`` or ``labels``.
Activation recomputation: full/uniform is the PipelineModule's ``activation_checkpoint_interval``;
full/block and selective are applied by training/engine.py and the attention module
(:mod:`megatron_tokenformer.model.recompute`). Sequence parallel: the stages exchange [b, s/p, d].
"""

from __future__ import annotations

from typing import List

import torch

from megatron_tokenformer.config import ModelConfig
from megatron_tokenformer.model.language_model import (
    LanguageModelEmbedding,
    get_block_class,
    language_model_loss,
    prepare_config,
)
from megatron_tokenformer.model.layernorm import LayerNorm
from megatron_tokenformer.model.sequence_parallel import sequence_parallel_enabled

TIED_EMBEDDING_KEY = "embed"
TIED_WEIGHT_ATTR = "word_embeddings.weight"


def embedding_forward(module: LanguageModelEmbedding, inputs) -> torch.Tensor:
    """First pipeline layer: ``(input_ids,)`` or ``input_ids`` [b, s] -> hidden [b, s, d]."""
    if isinstance(inputs, (tuple, list)):
        if len(inputs) != 1:
            raise ValueError(f"the Tokenformer pipeline expects inputs (input_ids,), got a tuple of {len(inputs)}")
        inputs = inputs[0]
    return module(inputs)


def logits_forward(module: LanguageModelEmbedding, hidden_states: torch.Tensor) -> torch.Tensor:
    """Last pipeline layer: hidden [b, s, d] -> vocab-parallel logits [b, s, V_pad/p] (tied weights)."""
    return module.logits(hidden_states)


def pipeline_loss_fn(logits: torch.Tensor, labels) -> torch.Tensor:
    """``labels``: ``(labels, loss_mask)`` or ``labels`` -> mean loss over unmasked tokens."""
    if isinstance(labels, (tuple, list)):
        labels, loss_mask = labels
    else:
        loss_mask = None
    return language_model_loss(logits, labels, loss_mask)


def get_layer_specs(config: ModelConfig, seed: int = 1234) -> List:
    """The DeepSpeed LayerSpec / TiedLayerSpec list of the Tokenformer LM (config copied, taus resolved)."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    config = prepare_config(config)
    specs = [TiedLayerSpec(TIED_EMBEDDING_KEY, LanguageModelEmbedding, config, seed, forward_fn=embedding_forward,
                           tied_weight_attr=TIED_WEIGHT_ATTR)]
    block_class = get_block_class(config)  # the model family's block (model/spec.py)
    specs += [LayerSpec(block_class, config, i + 1, seed) for i in range(config.num_layers)]
    specs.append(LayerSpec(LayerNorm, config.hidden_size, config.layernorm_epsilon, True,
                           params_dtype=config.torch_dtype, sequence_parallel=sequence_parallel_enabled(config)))
    specs.append(TiedLayerSpec(TIED_EMBEDDING_KEY, LanguageModelEmbedding, config, seed, forward_fn=logits_forward,
                               tied_weight_attr=TIED_WEIGHT_ATTR))
    return specs
