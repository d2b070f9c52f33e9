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
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

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


#: Config fields that are not written by :meth:`ModelConfig.to_dict` (chosen per run, per machine).
NOT_STORED = ("fused_pattention_norm",)

# --------------------------------------------------------------------------- command-line flags of the fields
#: The ``--help`` groups the model flags appear in (arguments.py adds the flags of each to its group).
ARCHITECTURE, PATTENTION, TRAINING, PARALLELISM = ("model architecture", "tokenformer (Pattention)", "training",
                                                  "parallelism")
FLAG_KINDS = ("positive_int", "positive_float", "float", "str", "switch", "optional_switch")
_FIELD_DEFAULT = object()


@dataclasses.dataclass(frozen=True)
class Flag:
    """How a config field appears on ``pretrain_tokenformer.py``'s command line: the flag ``--<dest>`` (dashes
    for underscores) that ``arguments.py`` generates from it, in ``--help`` group ``group``.

    ``kind``: one of :data:`FLAG_KINDS` (``switch``: ``--x`` sets True; ``optional_switch``: ``--x`` /
    ``--no-x``, None when neither is given). ``dest``: the flag's name when it differs from the field's
    (``--value-init-std`` sets ``value_init``). ``default``: the flag's default when it differs from the
    field's (a required field's flag defaults to None: ``validate_args`` asks for it or derives it). A flag
    left at None gives the field its default.
    """

    group: str
    kind: str
    help: str
    choices: Optional[Tuple[Any, ...]] = None
    dest: Optional[str] = None
    default: Any = _FIELD_DEFAULT


def _field(default: Any = dataclasses.MISSING, flag: Optional[Flag] = None):
    return dataclasses.field(default=default, metadata={"flag": flag} if flag else {})


def _tau_flag(what: str) -> Flag:
    return Flag(PATTENTION, "positive_float", f"tau (score scale) of {what} (default: sqrt of its token count, "
                                              "fixed at construction; a checkpoint's tau always wins, growth keeps it)")


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
    Pattention normalisation's elementwise steps compiled by ``torch.compile``; same function).
    ``checkpoint_activations=True`` is the old spelling of ``recompute_granularity="full"`` (uniform, 1 layer);
    the two are kept in step.
    """

    num_layers: int = _field(flag=Flag(ARCHITECTURE, "positive_int", "number of transformer blocks"))
    hidden_size: int = _field(flag=Flag(ARCHITECTURE, "positive_int", "model width d"))
    num_attention_heads: int = _field(flag=Flag(ARCHITECTURE, "positive_int", "attention heads"))
    seq_length: int = _field(flag=Flag(ARCHITECTURE, "positive_int", "tokens per training sample"))
    vocab_size: int = _field()  # from the tokenizer
    qkv_num_param_tokens: int = _field(flag=Flag(
        PATTENTION, "positive_int", "parameter tokens of each Q/K/V Pattention (default: --hidden-size)"))
    proj_num_param_tokens: int = _field(flag=Flag(
        PATTENTION, "positive_int", "parameter tokens of the attention output Pattention (default: --hidden-size)"))
    ffn_num_param_tokens: int = _field(flag=Flag(
        PATTENTION, "positive_int", "parameter tokens of the FFN Pattention (default: 4 x --hidden-size)"))
    max_position_embeddings: Optional[int] = _field(None, flag=Flag(
        ARCHITECTURE, "positive_int", "longest sequence the model supports (default: --seq-length)"))
    make_vocab_size_divisible_by: int = _field(128, flag=Flag(
        ARCHITECTURE, "positive_int", "pad the vocabulary to a multiple of this times the tensor-parallel size"))
    qkv_tau: Optional[float] = _field(None, flag=_tau_flag("each Q/K/V Pattention"))
    proj_tau: Optional[float] = _field(None, flag=_tau_flag("the attention output Pattention"))
    ffn_tau: Optional[float] = _field(None, flag=_tau_flag("the FFN Pattention"))
    pattention_normalization: str = _field("l2_norm_gelu", flag=Flag(
        PATTENTION, "str", "score normalisation over the parameter tokens", choices=PATTENTION_NORMALIZATIONS))
    norm_epsilon_pattention: float = _field(1e-6)
    rotary_percent: float = _field(0.25, flag=Flag(
        PATTENTION, "float", "fraction of each attention head's channels that get rotary embedding"))
    rotary_base: int = _field(10000)
    block_layernorm: str = _field("nonparametric")
    layernorm_epsilon: float = _field(1e-5)
    init_method_std: float = _field(0.02, flag=Flag(
        ARCHITECTURE, "float", "std of the key parameter tokens and the embedding"))
    value_init: Union[str, float] = _field("wang", flag=Flag(
        PATTENTION, "positive_float", "std of the value parameter tokens at initialisation (default: Wang's 2 / "
        "(num_layers x sqrt(hidden_size)), the official models' init; it does not depend on the token count n, so a "
        "Pattention's output scale grows like sqrt(n): docs/progressive_scaling.md)", dest="value_init_std",
        default=None))
    checkpoint_activations: bool = _field(False, flag=Flag(
        TRAINING, "switch", "recompute each block's activations in the backward pass (saves memory); the same as "
        "--recompute-granularity full --recompute-method uniform --recompute-num-layers 1"))
    params_dtype: str = _field("float32")
    model_type: str = _field("tokenformer", flag=Flag(
        ARCHITECTURE, "str", "tokenformer (Pattention projections), or transformer: the baseline pre-norm GPT with "
        "column/row-parallel linear layers, GeLU MLP of --ffn-hidden-size and parametric LayerNorms (the "
        "--*-num-param-tokens flags do not apply to it)", choices=MODEL_TYPES))
    ffn_hidden_size: Optional[int] = _field(None, flag=Flag(
        ARCHITECTURE, "positive_int", "--model-type transformer: MLP width (default: 4 x --hidden-size)"))
    sequence_parallel: bool = _field(False, flag=Flag(
        PARALLELISM, "switch", "split the residual stream and the LayerNorms along the sequence over the "
        "tensor-parallel ranks (all-gather / reduce-scatter instead of all-reduce; activations / TP); ignored at "
        "tensor-model-parallel size 1"))
    recompute_granularity: Optional[str] = _field(None, flag=Flag(
        TRAINING, "str", "activation recomputation in the backward pass: full = whole blocks (see "
        "--recompute-method), selective = the attention core only (the Pattention normalisations are always "
        "recomputed by the memory-lean Pattention)", choices=RECOMPUTE_GRANULARITIES))
    recompute_method: Optional[str] = _field(None, flag=Flag(
        TRAINING, "str", "with --recompute-granularity full: uniform = chunks of --recompute-num-layers blocks, "
        "each recomputed as one; block = only the first --recompute-num-layers blocks of each pipeline stage "
        "(default uniform)", choices=RECOMPUTE_METHODS))
    recompute_num_layers: Optional[int] = _field(None, flag=Flag(
        TRAINING, "positive_int", "blocks per recomputed chunk (uniform) or recomputed blocks per stage (block); "
        "default 1"))
    fused_pattention_norm: bool = _field(False, flag=Flag(
        TRAINING, "optional_switch", "compile the Pattention normalisation's elementwise steps with torch.compile "
        "(one kernel per step, reading the scores in their own dtype; the same function). Default: on when CUDA "
        "is available, off on CPU (the first iterations then include compilation)", default=None))

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

    def resolve_taus(self) -> "ModelConfig":
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
    def validate(self, tp: int = 1, pp: int = 1, name: Callable[[str], str] = None) -> "ModelConfig":
        """Raise ValueError with a message naming the offending field(s); return self when valid.

        ``name``: how a message names a field, and the sizes ``tensor_model_parallel_size`` /
        ``pipeline_model_parallel_size`` (default: the field itself, "the tensor-model-parallel size");
        the command line passes its flag names (``--ffn-hidden-size``).
        """
        n = name or _plain_name

        def positive(field):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{n(field)} must be a positive integer, got {value!r}")

        for field in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "vocab_size",
                      "qkv_num_param_tokens", "proj_num_param_tokens", "ffn_num_param_tokens",
                      "max_position_embeddings", "make_vocab_size_divisible_by"):
            positive(field)
        tp_size, pp_size = n("tensor_model_parallel_size"), n("pipeline_model_parallel_size")
        if tp < 1 or pp < 1:
            raise ValueError(f"tensor/pipeline parallel sizes must be >= 1, got tp={tp}, pp={pp}")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"{n('model_type')} must be one of {MODEL_TYPES}, got {self.model_type!r}")
        if self.pattention_normalization not in PATTENTION_NORMALIZATIONS:
            raise ValueError(f"{n('pattention_normalization')} must be one of {PATTENTION_NORMALIZATIONS}, "
                             f"got {self.pattention_normalization!r}")
        if self.block_layernorm not in BLOCK_LAYERNORMS:
            raise ValueError(f"{n('block_layernorm')} must be one of {BLOCK_LAYERNORMS}, got {self.block_layernorm!r}")
        if self.params_dtype not in PARAMS_DTYPES:
            raise ValueError(f"{n('params_dtype')} must be one of {PARAMS_DTYPES}, got {self.params_dtype!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(f"{n('hidden_size')} ({self.hidden_size}) is not divisible by {n('num_attention_heads')} "
                             f"({self.num_attention_heads})")
        if self.num_attention_heads % tp != 0:
            raise ValueError(f"{n('num_attention_heads')} ({self.num_attention_heads}) is not divisible by "
                             f"{tp_size} ({tp})")
        for field, why in MODEL_FAMILY_FIELDS[self.model_type].tp_divisible.items():
            positive(field)
            if getattr(self, field) % tp != 0:
                raise ValueError(f"{n(field)} ({getattr(self, field)}) is not divisible by {tp_size} ({tp}){why}")
        if self.num_layers % pp != 0:
            raise ValueError(f"{n('num_layers')} ({self.num_layers}) is not divisible by {pp_size} ({pp})")
        if not 0.0 <= self.rotary_percent <= 1.0:
            raise ValueError(f"{n('rotary_percent')} must be in [0, 1], got {self.rotary_percent}")
        if self.seq_length > self.max_position_embeddings:
            raise ValueError(f"{n('seq_length')} ({self.seq_length}) exceeds {n('max_position_embeddings')} "
                             f"({self.max_position_embeddings})")
        for field in ("qkv_tau", "proj_tau", "ffn_tau"):
            value = getattr(self, field)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{n(field)} must be a positive number or None, got {value!r}")
        for field in ("norm_epsilon_pattention", "layernorm_epsilon", "init_method_std"):
            if not getattr(self, field) > 0:
                raise ValueError(f"{n(field)} must be > 0, got {getattr(self, field)!r}")
        if self.recompute_granularity not in (None,) + RECOMPUTE_GRANULARITIES:
            raise ValueError(f"{n('recompute_granularity')} must be one of {RECOMPUTE_GRANULARITIES} or None, "
                             f"got {self.recompute_granularity!r}")
        if self.recompute_granularity == "selective" and self.checkpoint_activations:
            raise ValueError(f"{n('checkpoint_activations')} means {n('recompute_granularity')} 'full', not "
                             f"'selective'")
        if self.recompute_granularity == "full":
            if self.recompute_method not in RECOMPUTE_METHODS:
                raise ValueError(f"{n('recompute_method')} must be one of {RECOMPUTE_METHODS}, "
                                 f"got {self.recompute_method!r}")
            positive("recompute_num_layers")
        elif self.recompute_method is not None or self.recompute_num_layers is not None:
            raise ValueError(f"{n('recompute_method')} / {n('recompute_num_layers')} apply to "
                             f"{n('recompute_granularity')} 'full' only")
        if self.sequence_parallel and self.seq_length % tp != 0:
            raise ValueError(f"{n('seq_length')} ({self.seq_length}) is not divisible by {tp_size} "
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
    def from_dict(cls, data: Dict[str, Any]) -> "ModelConfig":
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
    def from_json(cls, path: Union[str, os.PathLike]) -> "ModelConfig":
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

_SIZE_NAMES = {"tensor_model_parallel_size": "the tensor-model-parallel size",
               "pipeline_model_parallel_size": "the pipeline-model-parallel size"}


def _plain_name(field: str) -> str:
    """How :meth:`ModelConfig.validate` names a field by default: the field itself."""
    return _SIZE_NAMES.get(field, field)


def _resolved_flags() -> Dict[str, Flag]:
    flags = {}
    for f in dataclasses.fields(ModelConfig):
        flag = f.metadata.get("flag")
        if flag is not None:
            default = flag.default
            if default is _FIELD_DEFAULT:
                default = None if f.default is dataclasses.MISSING else f.default
            flags[f.name] = dataclasses.replace(flag, dest=flag.dest or f.name, default=default)
    return flags


#: {config field: its command-line :class:`Flag` (``dest`` and ``default`` filled in)}, in field order.
FIELD_FLAGS: Dict[str, Flag] = _resolved_flags()
