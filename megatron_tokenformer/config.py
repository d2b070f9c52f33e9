"""TokenformerConfig: the model's hyper-parameters, with a JSON round trip (checkpoints store it)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Dict, Optional, Union

# The Pattention score normalisations (the official code's names); the math is in ops/pattention_norm.py.
PATTENTION_NORMALIZATIONS = ("l2_norm_gelu", "gelu_l2_norm", "softmax")
BLOCK_LAYERNORMS = ("nonparametric", "parametric")
MODEL_TYPES = ("tokenformer", "transformer")
PARAMS_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass
class TokenformerConfig:
    """Hyper-parameters of the Tokenformer LM (docs/design.md §2).

    Token counts: ``qkv_num_param_tokens`` for each of the Q, K, V Pattentions, ``proj_num_param_tokens``
    for the attention output Pattention, ``ffn_num_param_tokens`` for the FFN Pattention.
    ``*_tau`` = None means sqrt(n); :meth:`resolve_taus` turns them into floats once (the model then
    keeps them, also after growing n).
    ``value_init``: "wang" (std 2 / (L * sqrt(d))) or a float std for the value tokens.
    ``model_type``: "tokenformer" or "transformer" (the baseline GPT of
    :mod:`megatron_tokenformer.model.transformer`, whose MLP width is ``ffn_hidden_size``, default
    4 * hidden_size; it ignores the Pattention fields).
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

    def __post_init__(self):
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length
        if self.model_type == "transformer" and self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size

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
        if self.model_type == "transformer":
            positive("ffn_hidden_size")
            if self.ffn_hidden_size % tp != 0:
                raise ValueError(f"ffn_hidden_size ({self.ffn_hidden_size}) is not divisible by the "
                                 f"tensor-model-parallel size ({tp})")
        for name in ("qkv_num_param_tokens", "proj_num_param_tokens", "ffn_num_param_tokens"):
            if self.model_type == "tokenformer" and getattr(self, name) % tp != 0:
                raise ValueError(f"{name} ({getattr(self, name)}) is not divisible by the tensor-model-parallel "
                                 f"size ({tp}): each rank holds an equal block of parameter tokens")
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
        self.value_init_std()
        return self

    # --- serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

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
