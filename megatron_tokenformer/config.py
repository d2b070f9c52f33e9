"""The model config: one record of hyper-parameters for every model family, with a JSON round trip
(checkpoints store it).

The record is flat (the JSON schema every checkpoint holds); which of its fields a family uses and which
must divide by the tensor-parallel size is declared per family in :data:`MODEL_FAMILY_FIELDS`. The rest of
a family's description (block class, parameter names, FLOPs, growth) is its spec in
:mod:`megatron_tokenformer.model.spec`, keyed by the same names.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Dict, Mapping, Optional, Tuple, Union

# The Pattention score normalisations (the official code's names); the math is in ops/pattention_norm.py.
PATTENTION_NORMALIZATIONS = ("l2_norm_gelu", "gelu_l2_norm", "softmax")
BLOCK_LAYERNORMS = ("nonparametric", "parametric")
RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")
PARAMS_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class FamilyFields:
    """The config fields one model family owns (the config layer's part of its spec).

    ``uses``: the family-specific fields its model reads (the shared ones -- layers, width, heads,
    sequence, vocabulary, rotary, LayerNorms, init, dtype -- are used by every family; the other
    families' fields are stored but ignored). ``tp_divisible``: ``{field: why}`` for the fields whose
    value must be a positive integer divisible by the tensor-parallel size. ``default_4h``: fields that
    default to 4 x hidden_size when None. ``recommended``: values the command line and the family's
    config factory use for fields the user does not set (e.g. the baseline GPT's parametric LayerNorms).
    """

    uses: Tuple[str, ...]
    tp_divisible: Mapping[str, str]
    default_4h: Tuple[str, ...] = ()
    recommended: Mapping[str, Any] = dataclasses.field(default_factory=dict)


_PARAM_TOKEN_FIELDS = ("qkv_num_param_tokens", "proj_num_param_tokens", "ffn_num_param_tokens")

#: The model families (``model_type`` / ``--model-type``), in CLI order, and the fields each owns.
MODEL_FAMILY_FIELDS: Dict[str, FamilyFields] = {
    "tokenformer": FamilyFields(
        uses=_PARAM_TOKEN_FIELDS + ("qkv_tau", "proj_tau", "ffn_tau", "pattention_normalization",
                                    "norm_epsilon_pattention"),
        tp_divisible={name: ": each rank holds an equal block of parameter tokens" for name in _PARAM_TOKEN_FIELDS}),
    "transformer": FamilyFields(
        uses=("ffn_hidden_size",),
        tp_divisible={"ffn_hidden_size": ""},
        default_4h=("ffn_hidden_size",),
        recommended={"block_layernorm": "parametric"}),
}
MODEL_TYPES = tuple(MODEL_FAMILY_FIELDS)


#: Config fields that are not written by :meth:`TokenformerConfig.to_dict` (chosen per run, per machine).
NOT_STORED = ("fused_pattention_norm",)


@dataclasses.dataclass
class ModelConfig:
    """Hyper-parameters of the language model (docs/design.md §2), of every family.

    :data:`TokenformerConfig` is the same class under its first name (Tokenformer was the first family):
    ``model_type`` says which family the record describes, :data:`MODEL_FAMILY_FIELDS` which fields
    that family uses. The baseline GPT stores the Pattention fields too (unused) so that one JSON
    schema reads every checkpoint.

    Token counts: ``qkv_num_param_tokens`` for each of the Q, K, V Pattentions, ``proj_num_param_tokens``
    for the attention output Pattention, ``ffn_num_param_tokens`` for the FFN Pattention.
    ``*_tau`` = None means sqrt(n); :meth:`resolve_taus` turns them into floats once (the model then
    keeps them, also after growing n).
    ``value_init``: "wang" (std 2 / (L * sqrt(d))) or a float std for the value tokens.
    ``model_type``: one of :data:`MODEL_TYPES` (see :mod:`megatron_tokenformer.model.spec`); the
    baseline GPT's MLP width is ``ffn_hidden_size`` (default 4 * hidden_size).

    Runtime fields (they change what is kept in memory, not the function or the parameters; a
    checkpoint can be resumed with other values): ``sequence_parallel`` (split the residual stream along
    the sequence over the TP group; no effect at TP = 1), ``recompute_granularity`` ("full": recompute
    whole blocks, "selective": only the attention core; None: nothing), ``recompute_method``
    ("uniform": chunks of ``recompute_num_layers`` blocks, "block": the first ``recompute_num_layers``
    blocks of each pipeline stage; full only), ``recompute_num_layers``, ``fused_pattention_norm`` (the
    Pattention normalisation's elementwise steps compiled by ``torch.compile``; same function). ``checkpoint_activations=True``
    is the old spelling of ``recompute_granularity="full"`` (uniform, 1 layer); the two are kept in step.
    """

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    seq_length: int
    vocab_size: int
    qkv_num_param_tokens: int
    proj_num_param_tokens: int
    ffn_num_param_tokens: int
    max_position_embeddings: Optional[int] = None
    make_vocab_size_divisible_by: int = 128
    qkv_tau: Optional[float] = None
    proj_tau: Optional[float] = None
    ffn_tau: Optional[float] = None
    pattention_normalization: str = "l2_norm_gelu"
    norm_epsilon_pattention: float = 1e-6
    rotary_percent: float = 0.25
    rotary_base: int = 10000
    block_layernorm: str = "nonparametric"
    layernorm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    value_init: Union[str, float] = "wang"
    checkpoint_activations: bool = False
    params_dtype: str = "float32"
    model_type: str = "tokenformer"
    ffn_hidden_size: Optional[int] = None
    sequence_parallel: bool = False
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None
    fused_pattention_norm: bool = False

    def __post_init__(self):
        if self.checkpoint_activations and self.recompute_granularity is None:
            self.recompute_granularity = "full"
        if self.recompute_granularity == "full":
            self.checkpoint_activations = True
            if self.recompute_method is None:
                self.recompute_method = "uniform"
            if self.recompute_num_layers is None:
                self.recompute_num_layers = 1
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length
        family = MODEL_FAMILY_FIELDS.get(self.model_type)
        for name in (family.default_4h if family else ()):
            if getattr(self, name) is None:
                setattr(self, name, 4 * self.hidden_size)

    # --- derived values ---------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """Channels of each head that get rotary embedding (even, at most head_dim)."""
        dim = int(self.head_dim * self.rotary_percent)
        return dim - dim % 2

    def padded_vocab_size(self, tensor_model_parallel_size: int = 1) -> int:
        """Vocabulary padded to a multiple of make_vocab_size_divisible_by x TP (Megatron's rule)."""
        multiple = self.make_vocab_size_divisible_by * tensor_model_parallel_size
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def value_init_std(self) -> float:
        if isinstance(self.value_init, str):
            if self.value_init != "wang":
                raise ValueError(f"value_init must be 'wang' or a float std, got {self.value_init!r}")
            return 2.0 / (self.num_layers * math.sqrt(self.hidden_size))
        return float(self.value_init)

    def resolve_taus(self) -> "TokenformerConfig":
        """Replace tau=None by sqrt(n) (in place, once) and return self."""
        if self.qkv_tau is None:
            self.qkv_tau = math.sqrt(self.qkv_num_param_tokens)
        if self.proj_tau is None:
            self.proj_tau = math.sqrt(self.proj_num_param_tokens)
        if self.ffn_tau is None:
            self.ffn_tau = math.sqrt(self.ffn_num_param_tokens)
        self.qkv_tau, self.proj_tau, self.ffn_tau = float(self.qkv_tau), float(self.proj_tau), float(self.ffn_tau)
        return self

    @property
    def torch_dtype(self):
        import torch
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.params_dtype]

    # --- checks -----------------------------------------------------------------------------------
    def validate(self, tp: int = 1, pp: int = 1) -> "TokenformerConfig":
        """Raise ValueError with a message naming the offending field(s); return self when valid."""
        def positive(name):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "vocab_size",
                     "qkv_num_param_tokens", "proj_num_param_tokens", "ffn_num_param_tokens",
                     "max_position_embeddings", "make_vocab_size_divisible_by"):
            positive(name)
        if tp < 1 or pp < 1:
            raise ValueError(f"tensor/pipeline parallel sizes must be >= 1, got tp={tp}, pp={pp}")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        if self.pattention_normalization not in PATTENTION_NORMALIZATIONS:
            raise ValueError(f"pattention_normalization must be one of {PATTENTION_NORMALIZATIONS}, "
                             f"got {self.pattention_normalization!r}")
        if self.block_layernorm not in BLOCK_LAYERNORMS:
            raise ValueError(f"block_layernorm must be one of {BLOCK_LAYERNORMS}, got {self.block_layernorm!r}")
        if self.params_dtype not in PARAMS_DTYPES:
            raise ValueError(f"params_dtype must be one of {PARAMS_DTYPES}, got {self.params_dtype!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                             f"({self.num_attention_heads})")
        if self.num_attention_heads % tp != 0:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) is not divisible by the "
                             f"tensor-model-parallel size ({tp})")
        for name, why in MODEL_FAMILY_FIELDS[self.model_type].tp_divisible.items():
            positive(name)
            if getattr(self, name) % tp != 0:
                raise ValueError(f"{name} ({getattr(self, name)}) is not divisible by the tensor-model-parallel "
                                 f"size ({tp}){why}")
        if self.num_layers % pp != 0:
            raise ValueError(f"num_layers ({self.num_layers}) is not divisible by the pipeline-model-parallel "
                             f"size ({pp})")
        if not 0.0 <= self.rotary_percent <= 1.0:
            raise ValueError(f"rotary_percent must be in [0, 1], got {self.rotary_percent}")
        if self.seq_length > self.max_position_embeddings:
            raise ValueError(f"seq_length ({self.seq_length}) exceeds max_position_embeddings "
                             f"({self.max_position_embeddings})")
        for name in ("qkv_tau", "proj_tau", "ffn_tau"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{name} must be a positive number or None, got {value!r}")
        for name in ("norm_epsilon_pattention", "layernorm_epsilon", "init_method_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.recompute_granularity not in (None,) + RECOMPUTE_GRANULARITIES:
            raise ValueError(f"recompute_granularity must be one of {RECOMPUTE_GRANULARITIES} or None, "
                             f"got {self.recompute_granularity!r}")
        if self.recompute_granularity == "selective" and self.checkpoint_activations:
            raise ValueError("checkpoint_activations means recompute_granularity 'full', not 'selective'")
        if self.recompute_granularity == "full":
            if self.recompute_method not in RECOMPUTE_METHODS:
                raise ValueError(f"recompute_method must be one of {RECOMPUTE_METHODS}, got {self.recompute_method!r}")
            positive("recompute_num_layers")
        elif self.recompute_method is not None or self.recompute_num_layers is not None:
            raise ValueError("recompute_method / recompute_num_layers apply to recompute_granularity 'full' only")
        if self.sequence_parallel and self.seq_length % tp != 0:
            raise ValueError(f"seq_length ({self.seq_length}) is not divisible by the tensor-model-parallel size "
                             f"({tp}): sequence parallelism splits the sequence over the TP ranks")
        self.value_init_std()
        return self

    # --- serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """Every field but those of :data:`NOT_STORED` (how this run computes, not what the model is): what
        checkpoints, exports and JSON files record, so a checkpoint written on a GPU with the fused
        normalisation loads on a CPU without it (and in code that predates the field)."""
        data = dataclasses.asdict(self)
        for name in NOT_STORED:
            data.pop(name)
        return data

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "TokenformerConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown TokenformerConfig field(s): {', '.join(unknown)}")
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [name for name in required if name not in data]
        if missing:
            raise ValueError(f"missing TokenformerConfig field(s): {', '.join(missing)}")
        return cls(**data)

    def to_json(self, path: Union[str, os.PathLike]) -> None:
        """Write atomically (temporary file + rename)."""
        from megatron_tokenformer.fileio import atomic_write_text
        atomic_write_text(os.fspath(path), json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", fsync=False)

    @classmethod
    def from_json(cls, path: Union[str, os.PathLike]) -> "TokenformerConfig":
        try:
            with open(path) as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a valid JSON model config ({e})") from e
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a model config must be a JSON object")
        return cls.from_dict(data)


#: The first name of :class:`ModelConfig` (the same class; checkpoints and user code name it).
TokenformerConfig = ModelConfig
