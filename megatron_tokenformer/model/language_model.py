"""The language model of every family (docs/design.md §2), tensor parallel, PP = 1.

    ids [b, s] -> vocab-parallel tied embedding -> L x block -> final LayerNorm (parametric)
       -> vocab-parallel logits [b, s, V_pad/p] (tied to the embedding) -> vocab-parallel cross-entropy

The block is the config's family's (:mod:`megatron_tokenformer.model.spec`): ``TokenformerBlock`` or the
baseline GPT's ``TransformerBlock``; everything else is shared, hence the family-neutral names
:class:`GPTModel` and :class:`LanguageModelEmbedding` (Megatron-core's). ``TokenformerLM`` and
``TokenformerEmbedding`` are the same classes under their first names.
The pipeline version (:mod:`megatron_tokenformer.model.pipeline`) uses the same module classes.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from megatron_tokenformer import parallel_state
from megatron_tokenformer.config import ModelConfig
from megatron_tokenformer.model.attention import KVCache
from megatron_tokenformer.model.layernorm import LayerNorm
from megatron_tokenformer.model.recompute import run_layers
from megatron_tokenformer.model.sequence_parallel import sequence_parallel_enabled
from megatron_tokenformer.model.spec import get_spec
from megatron_tokenformer.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_tokenformer.tensor_parallel.layers import VocabParallelEmbedding, parallel_lm_logits
from megatron_tokenformer.tensor_parallel.mappings import all_reduce_loss_over_context_parallel, all_reduce_over


def get_block_class(config: ModelConfig):
    """The block class of ``config``'s model family (its spec's ``block_class``)."""
    return get_spec(config).block_class


def prepare_config(config: ModelConfig) -> ModelConfig:
    """A copy of ``config`` with taus resolved (sqrt(n) where None), validated for the current TP/PP."""
    config = copy.deepcopy(config).resolve_taus()
    config.__post_init__()  # checkpoint_activations set after construction still means full recomputation
    return config.validate(parallel_state.get_tensor_model_parallel_world_size(),
                           parallel_state.get_pipeline_model_parallel_world_size())


class LanguageModelEmbedding(nn.Module):
    """Input embedding, tied to the output layer. Parameter: ``word_embeddings.weight`` [V_pad/p, d].

    forward: input_ids [b, s] -> [b, s, d]. :meth:`logits`: [b, s, d] -> [b, s, V_pad/p] (padding = -inf).
    Sequence parallel: forward -> [b, s/p, d] (this rank's chunk); logits: [b, s/p, d] -> [b, s, V_pad/p].
    """

    def __init__(self, config: ModelConfig, seed: int = 1234):
        super().__init__()
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.sequence_parallel = sequence_parallel_enabled(config)
        self.word_embeddings = VocabParallelEmbedding(config.padded_vocab_size(tp), config.hidden_size,
                                                      vocab_size=config.vocab_size, init_std=config.init_method_std,
                                                      seed=seed, layer_number=0, tag="embedding.word_embeddings",
                                                      params_dtype=config.torch_dtype,
                                                      sequence_parallel=self.sequence_parallel)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return parallel_lm_logits(hidden_states, self.word_embeddings, sequence_parallel=self.sequence_parallel)


def language_model_loss(logits: torch.Tensor, labels: torch.Tensor,
                        loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean cross-entropy over the unmasked tokens (fp32 scalar, identical on all TP ranks).

    logits: [b, s, V_pad/p] vocab-parallel; labels: [b, s] long; loss_mask: [b, s] float or None (all ones).
    Context parallel (s = this rank's s/cp tokens): the mean over the tokens of the whole sequences,
    identical on all CP ranks (:func:`context_parallel_loss`).
    """
    losses = vocab_parallel_cross_entropy(logits, labels)
    if parallel_state.get_context_parallel_world_size() > 1:
        return context_parallel_loss(losses, loss_mask)
    if loss_mask is None:
        return losses.mean()
    loss_mask = loss_mask.to(losses.dtype)
    return (losses * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)


def context_parallel_loss(losses: torch.Tensor, loss_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """losses, loss_mask: [b, s/cp] of this context-parallel rank -> Σ CE·mask over the CP group / Σ mask over
    the CP group: the loss of the whole sequences (the number a CP = 1 run computes). Its backward carries
    cp times this rank's share, which the DP x CP gradient averaging divides again
    (:func:`~megatron_tokenformer.tensor_parallel.mappings.all_reduce_loss_over_context_parallel`)."""
    mask = torch.ones_like(losses) if loss_mask is None else loss_mask.to(losses.dtype)
    count = all_reduce_over(mask.sum(), "context")
    return all_reduce_loss_over_context_parallel((losses * mask).sum()) / count.clamp(min=1.0)


class GPTModel(nn.Module):
    """The language model of any family for PP = 1 (any TP). ``config`` is copied, its taus resolved and validated.

    forward(input_ids [b, s] long, labels [b, s] long or None, loss_mask [b, s] float or None,
            kv_cache :class:`~megatron_tokenformer.model.attention.KVCache` or None)
        -> loss (fp32 scalar, mean over unmasked tokens) when labels are given,
           else vocab-parallel logits [b, s, padded_vocab/p].
    With ``kv_cache`` the ids are the positions after the cached ones (incremental decoding, no
    recomputation; the cache is appended to in place).
    Submodules: ``embedding`` (``word_embeddings``), ``layers`` (ModuleList of TokenformerBlock, or of
    the block class of the config's model family, :mod:`megatron_tokenformer.model.spec`),
    ``final_layernorm``. Activation recomputation follows ``config.recompute_granularity`` /
    ``recompute_method`` / ``recompute_num_layers`` (:mod:`megatron_tokenformer.model.recompute`;
    ``checkpoint_activations`` = full, uniform, 1 layer). Sequence parallel when ``config.sequence_parallel``
    and TP > 1 (:mod:`megatron_tokenformer.model.sequence_parallel`).
    """

    def __init__(self, config: ModelConfig, seed: int = 1234):
        super().__init__()
        self.config = prepare_config(config)
        self.seed = seed
        config = self.config
        self.embedding = LanguageModelEmbedding(config, seed)
        block_class = get_block_class(config)
        self.layers = nn.ModuleList([block_class(config, i + 1, seed) for i in range(config.num_layers)])
        self.final_layernorm = LayerNorm(config.hidden_size, config.layernorm_epsilon, parametric=True,
                                         params_dtype=config.torch_dtype,
                                         sequence_parallel=sequence_parallel_enabled(config))

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                loss_mask: Optional[torch.Tensor] = None, kv_cache: Optional[KVCache] = None) -> torch.Tensor:
        config = self.config
        if kv_cache is not None and sequence_parallel_enabled(config):
            raise ValueError("decoding with a KV cache needs sequence_parallel off (one new position does not "
                             "split over the tensor-parallel ranks)")
        hidden = self.embedding(input_ids)
        if kv_cache is not None:
            for layer in self.layers:
                hidden = layer(hidden, kv_cache)
        else:
            hidden = run_layers(self.layers, hidden, config.recompute_granularity, config.recompute_method,
                                config.recompute_num_layers)
        logits = self.embedding.logits(self.final_layernorm(hidden))
        if labels is None:
            return logits
        return language_model_loss(logits, labels, loss_mask)


#: The first names of :class:`GPTModel` and :class:`LanguageModelEmbedding` (the same classes).
TokenformerLM = GPTModel
TokenformerEmbedding = LanguageModelEmbedding
