"""One spec per model family: what the rest of the package asks instead of testing ``model_type``.

A :class:`ModelSpec` declares, for one family (``--model-type``):

* ``block_class``: the transformer block the LM and the pipeline stack ``num_layers`` times;
* ``config_fields``: the config fields the family owns (:data:`~megatron_tokenformer.config.MODEL_FAMILY_FIELDS`);
* :meth:`~ModelSpec.classify`: a canonical parameter name (``layers.3.attention.query.key_param_tokens``)
  -> :class:`ParamInfo` (summary kind, tensor-parallel partition dim of the full tensor, block index,
  role in the family's growth rule);
* :meth:`~ModelSpec.forward_flops_per_token` and :meth:`~ModelSpec.parameter_counts` (from the config,
  no model needed; docs/design.md §6);
* ``growth_rule``: how a checkpoint of this family grows -- :data:`GROW_PARAM_TOKENS` (more parameter
  tokens / more layers, checkpointing/grow.py) or :data:`GROW_NET2NET_WIDTH` (wider residual stream and
  MLP, checkpointing/net2net.py).

:func:`get_spec` (a config or a ``model_type`` string) is the registry's one entry point.

Parameter names are the canonical ones of :mod:`megatron_tokenformer.model.naming` (the PP = 1 LM's
names), the same at every parallel layout. Block tensors are ``layers.{i}.<suffix>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Type, Union

from torch import nn

from megatron_tokenformer.config import MODEL_FAMILY_FIELDS, MODEL_TYPES, FamilyFields, ModelConfig
from megatron_tokenformer.errors import TokenformerError
from megatron_tokenformer.model.block import TokenformerBlock
from megatron_tokenformer.model.transformer import MODEL_TYPE as TRANSFORMER_MODEL_TYPE
from megatron_tokenformer.model.transformer import TransformerBlock

__all__ = ["ParamInfo", "ModelSpec", "config_parameter_counts", "TokenformerSpec", "TransformerSpec", "get_spec",
           "MODEL_SPECS", "PARAM_KINDS", "GROW_PARAM_TOKENS", "GROW_NET2NET_WIDTH", "UnknownParameterError",
           "tokenformer_forward_flops_per_token", "transformer_forward_flops_per_token"]

#: growth rules (``ModelSpec.growth_rule``)
GROW_PARAM_TOKENS = "param_tokens"
GROW_NET2NET_WIDTH = "net2net_width"

#: summary kinds (``ParamInfo.kind``) of every family, in the order the parameter summary prints them
PARAM_KINDS = ("qkv pattention", "proj pattention", "ffn pattention", "qkv linear", "proj linear", "mlp linear",
               "embedding", "layernorm", "other")

_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_EMBEDDING = "embedding.word_embeddings.weight"
_FINAL_LAYERNORM = ("final_layernorm.weight", "final_layernorm.bias")
_BLOCK_LAYERNORMS = {f"{ln}.{p}" for ln in ("input_layernorm", "post_attention_layernorm") for p in ("weight", "bias")}


def tokenformer_forward_flops_per_token(num_layers: int, hidden_size: int, seq_length: int, padded_vocab_size: int,
                                        qkv_num_param_tokens: int, proj_num_param_tokens: int,
                                        ffn_num_param_tokens: int) -> float:
    """Forward FLOPs per token of the Tokenformer LM (docs/design.md §6; a multiply-add counts 2).

    A Pattention d1 -> d2 with n tokens: ``X K^T`` 2 n d1 + ``S V`` 2 n d2; all are d -> d: 4 n d. Per
    block Q, K, V + output + FFN: ``4 d (3 n_qkv + n_proj + n_ffn)``; token-token attention ``4 T d``
    (``Q K^T`` and ``S V``, not halved for causality, as Megatron and PaLM); logits ``2 d V`` with V the
    padded vocabulary. Norms, rotary, GeLU, softmax and the loss (O(d) per token) are not counted.
    """
    d = hidden_size
    pattention = 4 * d * (3 * qkv_num_param_tokens + proj_num_param_tokens + ffn_num_param_tokens)
    attention = 4 * seq_length * d
    return float(num_layers * (pattention + attention) + 2 * d * padded_vocab_size)


def transformer_forward_flops_per_token(num_layers: int, hidden_size: int, seq_length: int, padded_vocab_size: int,
                                        ffn_hidden_size: int) -> float:
    """Forward FLOPs per token of the baseline Transformer: Q, K, V, output d x d (2 d^2 each), MLP
    d -> f -> d (4 d f), attention and logits as the Tokenformer: ``L (8 d^2 + 4 d f + 4 T d) + 2 d V``.
    (A Pattention with n tokens costs as much as a d x d linear layer when n = d / 2.)"""
    d, f = hidden_size, ffn_hidden_size
    return float(num_layers * (8 * d * d + 4 * d * f + 4 * seq_length * d) + 2 * d * padded_vocab_size)


class UnknownParameterError(TokenformerError, ValueError):
    """A parameter name that is not part of the family's model."""


@dataclass(frozen=True)
class ParamInfo:
    """What a canonical parameter name means in its family.

    ``kind``: one of :data:`PARAM_KINDS` (the parameter summary's category).
    ``partition_dim``: the dim along which tensor parallelism splits the full tensor, None when replicated.
    ``layer``: 0-based block index (``layers.{layer}.``), None outside the blocks.
    ``role``: the tensor's part in the family's growth rule. Tokenformer: ``"key"`` / ``"value"`` (a
    Pattention's token rows, [n, d]), ``"layernorm"``, ``"final_layernorm"``, ``"embedding"``.
    Transformer (Net2Net's shape classes, d = hidden, f = MLP width): ``"square"`` [d, d], ``"vector"`` [d],
    ``"h_to_4h"`` [f, d], ``"mlp_vector"`` [f], ``"4h_to_h"`` [d, f], ``"final_layernorm"`` [d],
    ``"embedding"`` [V, d].
    ``group``: the Pattention kind of a Tokenformer token tensor (``"qkv"``, ``"proj"``, ``"ffn"``), else None.
    """

    kind: str
    partition_dim: Optional[int]
    layer: Optional[int]
    role: str
    group: Optional[str] = None


class ModelSpec:
    """Base of the family specs; see the module docstring."""

    name: str = ""
    block_class: Type[nn.Module] = nn.Module
    growth_rule: str = ""

    @property
    def config_fields(self) -> FamilyFields:
        return MODEL_FAMILY_FIELDS[self.name]

    # -- parameter names
    def classify(self, name: str) -> ParamInfo:
        """:class:`ParamInfo` of a canonical parameter name; :class:`UnknownParameterError` if not the family's."""
        if name == _EMBEDDING:
            return ParamInfo("embedding", 0, None, "embedding")
        if name in _FINAL_LAYERNORM:
            return ParamInfo("layernorm", None, None, "final_layernorm")
        m = _LAYER_RE.match(name)
        if m:
            info = self._classify_block(m.group(2), int(m.group(1)))
            if info is not None:
                return info
        raise UnknownParameterError(f"{name!r} is not a parameter of a {self.name} model")

    def _classify_block(self, suffix: str, layer: int) -> Optional[ParamInfo]:
        raise NotImplementedError

    @staticmethod
    def block_suffix(name: str) -> Optional[Tuple[int, str]]:
        """``(layer index, suffix)`` of a block tensor ``layers.{i}.<suffix>``, None outside the blocks."""
        m = _LAYER_RE.match(name)
        return (int(m.group(1)), m.group(2)) if m else None

    # -- sizes
    def forward_flops_per_token(self, config: ModelConfig, padded_vocab_size: int) -> float:
        raise NotImplementedError

    def block_parameter_counts(self, config: ModelConfig) -> Dict[str, int]:
        """``{"attention": ..., "mlp": ...}`` parameters of all blocks together (no LayerNorms)."""
        raise NotImplementedError

    def parameter_counts(self, config: ModelConfig, tensor_model_parallel_size: int = 1,
                         include_embedding: bool = True, include_padding: bool = False) -> Dict[str, int]:
        """Global (all TP ranks together) parameter counts of the model ``config`` describes, from the
        config alone: ``{"embedding", "attention", "mlp", "layernorm", "total"}``.

        The tied embedding counts once: vocab_size * d (padded_vocab_size(tp) * d with
        ``include_padding``); ``"total"`` honours ``include_embedding``. Block LayerNorms add 4d per
        block when parametric, the final LayerNorm 2d.
        """
        d, layers = config.hidden_size, config.num_layers
        counts = self.block_parameter_counts(config)
        layernorm = 2 * d + (layers * 4 * d if config.block_layernorm == "parametric" else 0)
        vocab = config.padded_vocab_size(tensor_model_parallel_size) if include_padding else config.vocab_size
        embedding = vocab * d
        total = counts["attention"] + counts["mlp"] + layernorm + (embedding if include_embedding else 0)
        return {"embedding": embedding, "attention": counts["attention"], "mlp": counts["mlp"],
                "layernorm": layernorm, "total": total}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class TokenformerSpec(ModelSpec):
    """Tokenformer (docs/design.md §2): every projection is a Pattention d -> d.

    Block tensors: ``attention.{query,key,value,dense}.{key,value}_param_tokens`` and
    ``mlp.{key,value}_param_tokens``, each [n, d] split over TP along the tokens (dim 0); block
    LayerNorms (replicated). FLOPs: ``L (4 d (3 n_qkv + n_proj + n_ffn) + 4 T d) + 2 d V`` (a Pattention
    d -> d with n tokens costs 4 n d per token; token-token attention 4 T d, not halved for causality).
    """

    name = "tokenformer"
    block_class = TokenformerBlock
    growth_rule = GROW_PARAM_TOKENS
    #: Pattention kind -> its token-count config field
    token_fields = {"qkv": "qkv_num_param_tokens", "proj": "proj_num_param_tokens", "ffn": "ffn_num_param_tokens"}
    _KINDS = {"qkv": "qkv pattention", "proj": "proj pattention", "ffn": "ffn pattention"}

    def _classify_block(self, suffix, layer):
        if suffix in _BLOCK_LAYERNORMS:
            return ParamInfo("layernorm", None, layer, "layernorm")
        parts = suffix.split(".")
        if parts[0] == "attention" and len(parts) == 3 and parts[1] in ("query", "key", "value", "dense"):
            group, tensor = ("proj" if parts[1] == "dense" else "qkv"), parts[2]
        elif parts[0] == "mlp" and len(parts) == 2:
            group, tensor = "ffn", parts[1]
        else:
            return None
        if tensor not in ("key_param_tokens", "value_param_tokens"):
            return None
        return ParamInfo(self._KINDS[group], 0, layer, tensor[:-len("_param_tokens")], group)

    def forward_flops_per_token(self, config, padded_vocab_size):
        return tokenformer_forward_flops_per_token(
            config.num_layers, config.hidden_size, config.seq_length, padded_vocab_size,
            config.qkv_num_param_tokens, config.proj_num_param_tokens, config.ffn_num_param_tokens)

    def block_parameter_counts(self, config):
        # a Pattention d1 -> d2 with n tokens has n (d1 + d2) parameters; all are d -> d here
        d, layers = config.hidden_size, config.num_layers
        return {"attention": layers * 2 * d * (3 * config.qkv_num_param_tokens + config.proj_num_param_tokens),
                "mlp": layers * 2 * d * config.ffn_num_param_tokens}


class TransformerSpec(ModelSpec):
    """The baseline pre-norm GPT (:mod:`megatron_tokenformer.model.transformer`).

    Block tensors: ``attention.{query,key,value}.{weight,bias}`` (column-parallel, split on dim 0),
    ``attention.dense.weight`` (row-parallel, dim 1) and its bias (replicated), ``mlp.dense_h_to_4h``
    (column-parallel) and ``mlp.dense_4h_to_h`` (row-parallel), block LayerNorms. FLOPs:
    ``L (8 d^2 + 4 d f + 4 T d) + 2 d V``. Grows in width by Net2Net.
    """

    name = TRANSFORMER_MODEL_TYPE
    block_class = TransformerBlock
    growth_rule = GROW_NET2NET_WIDTH
    _TABLE = {
        # suffix: (kind, partition dim, Net2Net role)
        "attention.query.weight": ("qkv linear", 0, "square"), "attention.query.bias": ("qkv linear", 0, "vector"),
        "attention.key.weight": ("qkv linear", 0, "square"), "attention.key.bias": ("qkv linear", 0, "vector"),
        "attention.value.weight": ("qkv linear", 0, "square"), "attention.value.bias": ("qkv linear", 0, "vector"),
        "attention.dense.weight": ("proj linear", 1, "square"), "attention.dense.bias": ("proj linear", None, "vector"),
        "mlp.dense_h_to_4h.weight": ("mlp linear", 0, "h_to_4h"),
        "mlp.dense_h_to_4h.bias": ("mlp linear", 0, "mlp_vector"),
        "mlp.dense_4h_to_h.weight": ("mlp linear", 1, "4h_to_h"),
        "mlp.dense_4h_to_h.bias": ("mlp linear", None, "vector"),
    }

    def _classify_block(self, suffix, layer):
        if suffix in _BLOCK_LAYERNORMS:
            return ParamInfo("layernorm", None, layer, "vector")
        if suffix in self._TABLE:
            kind, dim, role = self._TABLE[suffix]
            return ParamInfo(kind, dim, layer, role)
        return None

    def forward_flops_per_token(self, config, padded_vocab_size):
        return transformer_forward_flops_per_token(config.num_layers, config.hidden_size, config.seq_length,
                                                   padded_vocab_size, config.ffn_hidden_size)

    def block_parameter_counts(self, config):
        d, f, layers = config.hidden_size, config.ffn_hidden_size, config.num_layers
        return {"attention": layers * 4 * (d * d + d), "mlp": layers * (2 * d * f + f + d)}


def config_parameter_counts(config: ModelConfig, tensor_model_parallel_size: int = 1,
                            include_embedding: bool = True, include_padding: bool = False) -> Dict[str, int]:
    """Parameter counts of the model ``config`` describes, from the config alone (its family's
    :meth:`ModelSpec.parameter_counts`). For the counts of an instantiated, distributed model see
    :func:`megatron_tokenformer.training.logging.count_model_parameters`."""
    return get_spec(config).parameter_counts(config, tensor_model_parallel_size, include_embedding, include_padding)


#: the registry: model_type -> spec
MODEL_SPECS: Dict[str, ModelSpec] = {spec.name: spec for spec in (TokenformerSpec(), TransformerSpec())}
assert tuple(MODEL_SPECS) == MODEL_TYPES, "one spec per model family of config.MODEL_FAMILY_FIELDS"


def get_spec(config_or_type: Union[ModelConfig, str, None]) -> ModelSpec:
    """The spec of a model config (its ``model_type``) or of a ``model_type`` string.

    An object without ``model_type`` (an older config) is a Tokenformer. ValueError for an unknown type.
    """
    model_type = config_or_type if isinstance(config_or_type, str) else \
        getattr(config_or_type, "model_type", MODEL_TYPES[0])
    try:
        return MODEL_SPECS[model_type]
    except KeyError:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}") from None
