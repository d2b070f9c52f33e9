"""A layout-independent view of any checkpoint this project writes, and the canonical writer.

:class:`CheckpointView` opens a step folder and presents, for every parameter under its CANONICAL
name (the PP = 1 :class:`~megatron_tokenformer.model.TokenformerLM` name, e.g.
``layers.3.mlp.key_param_tokens``):

- ``fp32``: the full fp32 master tensor (all TP ranks joined, vocabulary padding trimmed),
- each optimizer state (``exp_avg``, ``exp_avg_sq``, ...) in the same shape, and ``step``,

plus the training state (iteration, consumed samples, LR schedule, loss scaler) and the model config.
Nothing is loaded up front: tensors are read on request, fragment by fragment, with ``os.pread``
(:mod:`.tensor_file`), so memory stays at the size of what the caller asks for.

Two storage kinds are read:

* ``deepspeed`` (written by training): DeepSpeed's files at the training layout. The model-parallel
  rank ``m = pp_stage * tp + tp_rank`` has ``mp_rank_<m>_model_states.pt`` (with the project's
  parameter map in its client state) and one ZeRO file per data-parallel rank ``d``,
  ``zero_pp_rank_<d>_mp_rank_<m>_optim_states.pt``, whose flat fp32/Adam partitions hold each
  parameter as consecutive fragments (``param_slice_mappings``). A parameter's local tensor on TP
  rank r is the concatenation of its fragments over d = 0..dp-1; the full tensor is the local
  tensors of r = 0..tp-1 joined along the parameter's partition dimension.
* ``canonical`` (written by tools/expand_checkpoint.py): ``canonical/<name>/<key>.pt``, one full
  tensor per file, loadable at any layout.

:meth:`CheckpointView.read_tp_slice` gives the slice a rank of ANY target layout needs (vocabulary
re-padded for the target TP), reading only that slice's bytes where the partitioning allows.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from megatron_tokenformer.checkpointing import files
from megatron_tokenformer.checkpointing.optimizer_step import get_adam_step
from megatron_tokenformer.checkpointing.tensor_file import LazyTensor, TorchFile, materialize

__all__ = ["ParamEntry", "CheckpointView", "CanonicalWriter", "CheckpointFormatError", "open_checkpoint",
           "tp_slice_rows", "DTYPES"]

CLIENT_STATE_KEY = "tokenformer"
FP32 = "fp32"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointFormatError(ValueError):
    """A checkpoint folder is incomplete or inconsistent (missing shard, shapes that do not add up)."""


@dataclass
class ParamEntry:
    """One parameter of the canonical view.

    shape: the FULL shape (all TP ranks; vocabulary padding trimmed to ``config.vocab_size`` rows).
    dtype: the model (low-precision) dtype name; the fp32 master is always float32.
    partition_dim: the TP partition dimension, or None for a parameter replicated on the TP group.
    vocab: rows >= vocab_size are padding (re-added with zeros for the target TP).
    step: the optimizer step count of its group (None when there is no optimizer state).
    """

    name: str
    shape: Tuple[int, ...]
    dtype: str = "float32"
    partition_dim: Optional[int] = None
    vocab: bool = False
    step: Optional[float] = None

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype,
                "partition_dim": self.partition_dim, "vocab": self.vocab, "step": self.step}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ParamEntry":
        return cls(d["name"], tuple(int(s) for s in d["shape"]), d.get("dtype", "float32"), d.get("partition_dim"),
                   bool(d.get("vocab", False)), d.get("step"))

    def numel(self) -> int:
        return int(math.prod(self.shape))

    def nbytes(self, key: str = FP32) -> int:
        esize = 4 if key != "param" else torch.empty((), dtype=DTYPES[self.dtype]).element_size()
        return self.numel() * esize


# --------------------------------------------------------------------------- fragments
@dataclass
class _Fragment:
    start: int            # offset in the flattened local tensor
    numel: int
    source: LazyTensor
    source_start: int     # offset in the flattened source tensor


class _Zeros:
    """A source of zeros (the optimizer state of a parameter that had none)."""

    dtype = torch.float32

    def __init__(self, numel: int):
        self._numel = numel

    def numel(self) -> int:
        return self._numel

    def read_flat(self, start: int, count: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        if out is None:
            return torch.zeros(count, dtype=torch.float32)
        return out.zero_()


def _fill_frozen(sd, param_list, local_by_name, state_keys) -> None:
    """Parameters trained with ``requires_grad = False`` (--train-only-new-param-tokens,
    training/param_token_freezing.py) have no ZeRO fragment: their value is the module weight and their
    optimizer state is zero."""
    module = sd.get("module") if isinstance(sd, dict) else None
    for p in param_list:
        per_key = local_by_name[p["name"]]
        t = (module or {}).get(p["name"])
        if per_key or not isinstance(t, LazyTensor):
            continue  # trained, or nothing to fill from (the completeness check reports it)
        shape = tuple(int(s) for s in p["shape"])
        per_key[FP32] = _LocalTensor(shape, [_Fragment(0, t.numel(), t, 0)])
        for key in state_keys:
            per_key[key] = _LocalTensor(shape, [_Fragment(0, t.numel(), _Zeros(t.numel()), 0)])


@dataclass
class _LocalTensor:
    """One TP rank's tensor of a parameter, as consecutive fragments of its flattened form."""

    shape: Tuple[int, ...]
    fragments: List[_Fragment] = field(default_factory=list)

    def numel(self) -> int:
        return int(math.prod(self.shape))

    def check(self, what: str) -> None:
        pos = 0
        for f in self.fragments:
            if f.start != pos:
                raise CheckpointFormatError(f"{what}: fragments do not tile the tensor (gap or overlap at "
                                            f"element {pos}, next fragment starts at {f.start}); a ZeRO shard "
                                            "is missing or belongs to another checkpoint")
            pos += f.numel
        if pos != self.numel():
            raise CheckpointFormatError(f"{what}: fragments cover {pos} elements but the shape "
                                        f"{tuple(self.shape)} has {self.numel()}; a ZeRO shard is missing or "
                                        "the shapes are inconsistent")

    def read_range(self, lo: int, hi: int, out: torch.Tensor) -> None:
        """Elements [lo, hi) of the flattened local tensor into the 1-D ``out`` (len hi - lo)."""
        for f in self.fragments:
            a, b = max(lo, f.start), min(hi, f.start + f.numel)
            if a >= b:
                continue
            piece = out[a - lo:b - lo]
            if f.source.dtype == piece.dtype:
                f.source.read_flat(f.source_start + (a - f.start), b - a, out=piece)
            else:
                piece.copy_(f.source.read_flat(f.source_start + (a - f.start), b - a))


def tp_slice_rows(total_rows: int, tp_rank: int, tp_size: int) -> Tuple[int, int]:
    """Rows [start, stop) of a dim-0 partitioned tensor held by ``tp_rank`` of ``tp_size``."""
    if total_rows % tp_size:
        raise ValueError(f"{total_rows} rows are not divisible by the tensor-model-parallel size {tp_size}")
    local = total_rows // tp_size
    return tp_rank * local, (tp_rank + 1) * local


# --------------------------------------------------------------------------- the view
class CheckpointView:
    """Canonical, lazily-read view of one step folder (see the module docstring)."""

    def __init__(self, step_dir: str):
        from megatron_tokenformer.config import TokenformerConfig

        self.step_dir = os.path.abspath(step_dir)
        self.meta = files.read_meta(self.step_dir)
        self.kind = self.meta.get("kind")
        try:
            self.config = TokenformerConfig.from_dict(self.meta["model_config"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointFormatError(f"{self.step_dir}/{files.META_FILE}: invalid model_config ({exc})") from None
        self.layout: Dict[str, Any] = dict(self.meta.get("layout", {}))
        self.params: "OrderedDict[str, ParamEntry]" = OrderedDict()
        self.state_keys: List[str] = []
        self.training_state: Dict[str, Any] = {}
        self._files: List[TorchFile] = []
        # canonical name -> key -> list of _LocalTensor (one per source TP rank, or one when replicated)
        self._locals: Dict[str, Dict[str, List[_LocalTensor]]] = {}
        if self.kind == files.KIND_DEEPSPEED:
            self._open_deepspeed()
        elif self.kind == files.KIND_CANONICAL:
            self._open_canonical()
        else:
            raise CheckpointFormatError(f"{self.step_dir}: unknown checkpoint kind {self.kind!r}")

    # ---- public API
    @property
    def iteration(self) -> int:
        return int(self.training_state.get("iteration", self.meta.get("iteration", 0)))

    @property
    def keys(self) -> List[str]:
        """What can be read per parameter: 'fp32' and the optimizer state keys."""
        return [FP32] + list(self.state_keys)

    def read(self, name: str, key: str = FP32) -> torch.Tensor:
        """The full tensor (fp32 for 'fp32' and optimizer states), shape ``params[name].shape``."""
        entry = self._entry(name)
        locals_ = self._local_list(name, key)
        if entry.partition_dim not in (None, 0):
            return self._read_joined(entry, locals_)
        out = torch.empty(entry.shape, dtype=torch.float32)
        self._read_flat(locals_, 0, entry.numel(), out.view(-1))
        return out

    def read_rows(self, name: str, key: str, start: int, stop: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rows [start, stop) along dim 0 of the full (trimmed) tensor."""
        entry = self._entry(name)
        if not 0 <= start <= stop <= entry.shape[0]:
            raise ValueError(f"{name}: rows [{start}, {stop}) outside {entry.shape[0]} rows")
        locals_ = self._local_list(name, key)
        row = int(math.prod(entry.shape[1:]))
        shape = (stop - start,) + tuple(entry.shape[1:])
        if out is None:
            out = torch.empty(shape, dtype=torch.float32)
        if entry.partition_dim not in (None, 0):
            out.copy_(self._read_joined(entry, locals_)[start:stop])
            return out
        self._read_flat(locals_, start * row, stop * row, out.view(-1))
        return out

    def read_tp_slice(self, name: str, key: str, tp_rank: int, tp_size: int,
                      padded_vocab_size: Optional[int] = None) -> torch.Tensor:
        """The tensor TP rank ``tp_rank`` of ``tp_size`` holds (fp32).

        Vocabulary parameters are padded with zero rows to ``padded_vocab_size`` first (the target
        layout's padded size); replicated parameters are returned whole.
        """
        entry = self._entry(name)
        if entry.partition_dim is None:
            return self.read(name, key)
        if entry.partition_dim != 0:
            full = self.read(name, key)
            if full.shape[entry.partition_dim] % tp_size:
                raise ValueError(f"{name}: dim {entry.partition_dim} of {tuple(full.shape)} is not divisible by "
                                 f"the tensor-model-parallel size {tp_size}")
            return full.chunk(tp_size, dim=entry.partition_dim)[tp_rank].contiguous()
        total = entry.shape[0]
        if entry.vocab:
            if padded_vocab_size is None or padded_vocab_size < total:
                raise ValueError(f"{name}: needs the target padded vocabulary size (>= {total})")
            total = padded_vocab_size
        start, stop = tp_slice_rows(total, tp_rank, tp_size)
        out = torch.zeros((stop - start,) + tuple(entry.shape[1:]), dtype=torch.float32)
        valid_stop = min(stop, entry.shape[0])
        if valid_stop > start:
            self.read_rows(name, key, start, valid_stop, out=out[:valid_stop - start])
        return out

    def flat_sources(self, name: str, key: str, lo: int, hi: int) -> Optional[List[Tuple[int, int, int, int]]]:
        """Where elements [lo, hi) of the flattened full tensor lie on disk, for a byte-for-byte copy.

        Returns ``[(file path, file offset, nbytes, output byte offset), ...]`` (output offsets
        relative to element ``lo``), or None when the bytes cannot be copied as they are (a dtype
        conversion, or a partition dimension other than 0).
        """
        entry = self._entry(name)
        if entry.partition_dim not in (None, 0):
            return None
        out: List[Tuple[int, int, int, int]] = []
        base = 0
        for local in self._local_list(name, key):
            n = local.numel()
            a, b = max(lo, base), min(hi, base + n)
            if a < b:
                for f in local.fragments:
                    fa, fb = max(a - base, f.start), min(b - base, f.start + f.numel)
                    if fa >= fb:
                        continue
                    if f.source.dtype != torch.float32:
                        return None
                    tfile = f.source.storage.file
                    offset = tfile.byte_offset(f.source, f.source_start + (fa - f.start))
                    out.append((tfile.path, offset, (fb - fa) * 4, (base + fa - lo) * 4))
            base += n
            if base >= hi:
                break
        return out

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files = []

    def __enter__(self) -> "CheckpointView":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- internals
    def _entry(self, name: str) -> ParamEntry:
        try:
            return self.params[name]
        except KeyError:
            raise KeyError(f"{self.step_dir}: no parameter named {name!r}") from None

    def _local_list(self, name: str, key: str) -> List[_LocalTensor]:
        per_key = self._locals.get(name, {})
        if key not in per_key:
            have = ", ".join(sorted(per_key)) or "nothing"
            raise KeyError(f"{self.step_dir}: parameter {name!r} has no {key!r} (has {have})")
        return per_key[key]

    @staticmethod
    def _read_flat(locals_: List[_LocalTensor], lo: int, hi: int, out: torch.Tensor) -> None:
        base = 0
        for local in locals_:
            n = local.numel()
            a, b = max(lo, base), min(hi, base + n)
            if a < b:
                local.read_range(a - base, b - base, out[a - lo:b - lo])
            base += n
            if base >= hi:
                break

    @staticmethod
    def _read_joined(entry: ParamEntry, locals_: List[_LocalTensor]) -> torch.Tensor:
        pieces = []
        for local in locals_:
            t = torch.empty(local.shape, dtype=torch.float32)
            local.read_range(0, local.numel(), t.view(-1))
            pieces.append(t)
        full = torch.cat(pieces, dim=entry.partition_dim)
        if entry.vocab:
            full = full[:entry.shape[0]].contiguous()
        return full

    def _open(self, path: str) -> TorchFile:
        if not os.path.isfile(path):
            raise CheckpointFormatError(f"missing checkpoint file {path}")
        f = TorchFile(path)
        self._files.append(f)
        return f

    # ---- canonical kind
    def _open_canonical(self) -> None:
        self.params = OrderedDict((d["name"], ParamEntry.from_dict(d)) for d in self.meta.get("params", []))
        if not self.params:
            raise CheckpointFormatError(f"{self.step_dir}/{files.META_FILE}: no parameter list")
        self.state_keys = list(self.meta.get("optimizer_state_keys", []))
        self.training_state = dict(self.meta.get("training_state", {}))
        root = os.path.join(self.step_dir, files.CANONICAL_DIR)
        for name, entry in self.params.items():
            per_key = {}
            for key in self.keys:
                f = self._open(os.path.join(root, name, f"{key}.pt"))
                t = f.obj
                if not isinstance(t, LazyTensor) or tuple(t.shape) != tuple(entry.shape):
                    raise CheckpointFormatError(f"{f.path}: expected a tensor of shape {tuple(entry.shape)}, got "
                                                f"{getattr(t, 'shape', type(t).__name__)}")
                local = _LocalTensor(tuple(entry.shape), [_Fragment(0, entry.numel(), t, 0)])
                per_key[key] = [local]
            self._locals[name] = per_key

    # ---- deepspeed kind
    def _open_deepspeed(self) -> None:
        lay = self.layout
        try:
            tp, pp, dp = (int(lay["tensor_model_parallel_size"]), int(lay["pipeline_model_parallel_size"]),
                          int(lay["data_parallel_size"]))
        except KeyError as exc:
            raise CheckpointFormatError(f"{self.step_dir}/{files.META_FILE}: layout lacks {exc}") from None
        zero_stage = int(lay.get("zero_stage", 0))
        vocab_size = self.config.vocab_size
        # canonical name -> {tp_rank -> (local shape, entry dict)}; first pipeline stage that has it wins
        found: "OrderedDict[str, Dict[int, Tuple[Tuple[int, ...], dict, int]]]" = OrderedDict()
        per_mp_locals: Dict[Tuple[int, str], Dict[str, _LocalTensor]] = {}
        steps: Dict[str, float] = {}
        state_keys: Optional[List[str]] = None
        training_state: Dict[str, Any] = {}

        for m in range(tp * pp):
            stage, tp_rank = divmod(m, tp)
            model_path = os.path.join(self.step_dir, f"mp_rank_{m:02d}_model_states.pt")
            mf = self._open(model_path)
            sd = mf.obj
            cs = sd.get(CLIENT_STATE_KEY) if isinstance(sd, dict) else None
            if not isinstance(cs, dict) or "params" not in cs:
                raise CheckpointFormatError(f"{model_path}: no '{CLIENT_STATE_KEY}' parameter map (not written by "
                                            "megatron_tokenformer's save_checkpoint)")
            if (cs.get("pipeline_rank"), cs.get("tensor_rank")) != (stage, tp_rank):
                raise CheckpointFormatError(f"{model_path}: written by pipeline/tensor rank "
                                            f"({cs.get('pipeline_rank')}, {cs.get('tensor_rank')}), expected "
                                            f"({stage}, {tp_rank}) for layout tp={tp}, pp={pp}")
            if m == 0:
                training_state = {
                    "iteration": int(cs.get("iteration", 0)),
                    "consumed_samples": int(cs.get("consumed_samples", 0)),
                    "global_steps": int(sd.get("global_steps", 0)),
                    "global_samples": int(sd.get("global_samples", 0)),
                    "skipped_steps": int(sd.get("skipped_steps", 0)),
                    "lr_scheduler": files.jsonable(materialize(sd.get("lr_scheduler"))),
                }
            param_list = cs["params"]
            local_by_name: Dict[str, Dict[str, _LocalTensor]] = {}
            for p in param_list:
                shape = tuple(int(s) for s in p["shape"])
                local_by_name[p["name"]] = {}
                canon = p["canonical"]
                slot = found.setdefault(canon, {})
                if tp_rank not in slot:
                    slot[tp_rank] = (shape, p, m)
            if zero_stage >= 1:
                keys = self._read_zero_shards(m, dp, param_list, local_by_name, steps, training_state, model_path)
                _fill_frozen(sd, param_list, local_by_name, keys)
            else:
                keys = self._read_stage0(m, sd, cs, param_list, local_by_name, steps, model_path)
            if state_keys is None:
                state_keys = keys
            elif keys != state_keys:
                raise CheckpointFormatError(f"{self.step_dir}: optimizer state keys differ between model-parallel "
                                            f"ranks ({state_keys} vs {keys})")
            for name, per_key in local_by_name.items():
                per_mp_locals[(m, name)] = per_key

        self.state_keys = list(state_keys or [])
        self.training_state = training_state
        for canon, slot in found.items():
            ranks = sorted(slot)
            shape0, p0, _ = slot[ranks[0]]
            pdim = p0.get("partition_dim")
            if pdim is None:
                ranks = ranks[:1]
            elif ranks != list(range(tp)):
                raise CheckpointFormatError(f"{self.step_dir}: parameter {canon} is missing on tensor ranks "
                                            f"{sorted(set(range(tp)) - set(ranks))}")
            full = list(shape0)
            if pdim is not None:
                full[pdim] = sum(slot[r][0][pdim] for r in ranks)
            is_vocab = bool(p0.get("vocab", False))
            if is_vocab:
                if pdim != 0:
                    raise CheckpointFormatError(f"{canon}: a vocabulary parameter must be partitioned along dim 0")
                full[0] = vocab_size
            per_key: Dict[str, List[_LocalTensor]] = {}
            for key in self.keys:
                lst = []
                for r in ranks:
                    shape, p, m = slot[r]
                    local = per_mp_locals[(m, p["name"])].get(key)
                    if local is None:
                        raise CheckpointFormatError(f"{self.step_dir}: no {key} for {p['name']} on model-parallel "
                                                    f"rank {m}")
                    local.check(f"{self.step_dir}: {key} of {p['name']} (model-parallel rank {m})")
                    lst.append(local)
                per_key[key] = lst
            self._locals[canon] = per_key
            step = steps.get(f"{slot[ranks[0]][2]}/{p0['name']}")
            self.params[canon] = ParamEntry(canon, tuple(full), p0.get("dtype", "float32"), pdim, is_vocab, step)

    def _read_zero_shards(self, m, dp, param_list, local_by_name, steps, training_state, model_path) -> List[str]:
        shapes = {p["name"]: tuple(int(s) for s in p["shape"]) for p in param_list}
        keys: Optional[List[str]] = None
        for d in range(dp):
            path = os.path.join(self.step_dir, f"zero_pp_rank_{d}_mp_rank_{m:02d}_optim_states.pt")
            if not os.path.isfile(path):  # DeepSpeed names the shards of a bf16 run bf16_zero_pp_rank_...
                alt = os.path.join(self.step_dir, f"bf16_zero_pp_rank_{d}_mp_rank_{m:02d}_optim_states.pt")
                if not os.path.isfile(alt):
                    raise CheckpointFormatError(f"missing ZeRO shard {path} (the layout says data_parallel_size={dp})")
                path = alt
            zf = self._open(path)
            osd = zf.obj.get("optimizer_state_dict") if isinstance(zf.obj, dict) else None
            if not isinstance(osd, dict) or "param_slice_mappings" not in osd \
                    or "single_partition_of_fp32_groups" not in osd:
                raise CheckpointFormatError(f"{path}: not a DeepSpeed ZeRO-1/2 optimizer shard (DeepSpeed's "
                                            "BF16_Optimizer and ZeRO-3 checkpoints are not supported)")
            if m == 0 and d == 0:
                training_state["loss_scaler"] = _loss_scaler_state(osd.get("loss_scaler"))
            fp32_groups = osd["single_partition_of_fp32_groups"]
            base = osd["base_optimizer_state"]
            mappings = osd["param_slice_mappings"]
            for g, mapping in enumerate(mappings):
                if isinstance(base, dict):       # "rigid" layout: a torch optimizer state_dict
                    st = base["state"].get(g, base["state"].get(str(g), {}))
                    groups = base.get("param_groups") or []
                    step = get_adam_step(groups[g] if g < len(groups) else None, st)  # apex: in the group
                else:                             # elastic layout: list of per-group states
                    st = base[g]
                    step = osd.get("base_optimizer_state_step")
                step = float(materialize(step)) if step is not None else None
                tensor_keys = sorted(k for k, v in st.items()
                                     if isinstance(v, LazyTensor) and len(v.shape) == 1 and k != "step")
                if mapping:
                    if keys is None:
                        keys = tensor_keys
                    elif tensor_keys != keys:
                        raise CheckpointFormatError(f"{path}: optimizer state keys {tensor_keys} differ from {keys}")
                for name, addr in mapping.items():
                    if name not in local_by_name:
                        raise CheckpointFormatError(f"{path}: parameter {name} is not in {model_path}'s map")
                    per_key = local_by_name[name]
                    sources = {FP32: fp32_groups[g]}
                    sources.update({k: st[k] for k in tensor_keys})
                    start, numel = int(addr.start), int(addr.numel)
                    for key, src in sources.items():
                        local = per_key.setdefault(key, _LocalTensor(shapes[name]))
                        pos = sum(f.numel for f in local.fragments)
                        if start + numel > src.numel():
                            raise CheckpointFormatError(f"{path}: fragment of {name} [{start}, {start + numel}) "
                                                        f"exceeds its partition ({src.numel()} elements)")
                        local.fragments.append(_Fragment(pos, numel, src, start))
                    if step is not None:
                        steps[f"{m}/{name}"] = step
        return list(keys or [])

    def _read_stage0(self, m, sd, cs, param_list, local_by_name, steps, model_path) -> List[str]:
        module = sd.get("module")
        if module is None:
            raise CheckpointFormatError(f"{model_path}: ZeRO stage 0 with pipeline parallelism keeps weights in "
                                        "layer files; the resharding path needs --zero-stage 1 or 2")
        if self.layout.get("precision", "fp32") != "fp32":
            raise CheckpointFormatError(f"{model_path}: ZeRO stage 0 with {self.layout.get('precision')} is not "
                                        "supported by the resharding path; train with --zero-stage 1")
        opt = sd.get("optimizer")
        groups = cs.get("optimizer_groups")
        shapes = {p["name"]: tuple(int(s) for s in p["shape"]) for p in param_list}
        keys: List[str] = []
        for p in param_list:
            t = module.get(p["name"])
            if not isinstance(t, LazyTensor):
                raise CheckpointFormatError(f"{model_path}: module has no tensor {p['name']}")
            local_by_name[p["name"]][FP32] = _LocalTensor(shapes[p["name"]], [_Fragment(0, t.numel(), t, 0)])
        if isinstance(opt, dict) and groups:
            index = 0
            state = opt.get("state", {})
            saved_groups = opt.get("param_groups") or []
            for gi, group in enumerate(groups):
                for name in group:
                    st = state.get(index, {})
                    tensor_keys = sorted(k for k, v in st.items() if isinstance(v, LazyTensor) and k != "step"
                                         and tuple(v.shape) == shapes[name])
                    keys = keys or tensor_keys
                    for k in tensor_keys:
                        local_by_name[name][k] = _LocalTensor(shapes[name], [_Fragment(0, st[k].numel(), st[k], 0)])
                    step = get_adam_step(saved_groups[gi] if gi < len(saved_groups) else None, st)
                    if step is not None:
                        steps[f"{m}/{name}"] = float(materialize(step))
                    index += 1
        return keys


def _loss_scaler_state(scaler) -> Optional[Dict[str, Any]]:
    if scaler is None:
        return None
    out = {}
    for attr in ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis", "dynamic"):
        if hasattr(scaler, attr):
            out[attr] = files.jsonable(getattr(scaler, attr))
    return out


def open_checkpoint(load_dir: str, iteration: Optional[int] = None) -> CheckpointView:
    """The view of ``load_dir``'s step ``iteration`` (default: the one ``latest`` names)."""
    step_dir = files.resolve_step_dir(load_dir, iteration)
    if step_dir is None:
        raise FileNotFoundError(f"{load_dir}: no `latest` file, nothing to read (pass --iteration N)")
    return CheckpointView(step_dir)


# --------------------------------------------------------------------------- canonical writer
class CanonicalWriter:
    """Writes a ``canonical`` step folder: one file per (parameter, key), then the metadata.

    Used as: ``w = CanonicalWriter(partial_dir)``; ``w.write(name, key, tensor)`` for every parameter
    and key; ``w.finish(meta)`` writes the metadata. Each tensor file is fsynced when written
    (``fsync=False``: left to the operating system).
    """

    def __init__(self, step_dir: str, fsync: bool = True):
        self.step_dir = step_dir
        self.fsync = fsync
        self.root = os.path.join(step_dir, files.CANONICAL_DIR)
        os.makedirs(self.root, exist_ok=True)
        self.bytes_written = 0

    def write(self, name: str, key: str, tensor: torch.Tensor) -> None:
        folder = os.path.join(self.root, name)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{key}.pt")
        tensor = tensor.detach().contiguous()
        with open(path, "wb") as f, _no_zip_crc():
            torch.save(tensor, f)
            if self.fsync:
                f.flush()
                os.fsync(f.fileno())
        self.bytes_written += tensor.numel() * tensor.element_size()

    def write_parts(self, name: str, key: str, shape: Tuple[int, ...], copies: List[Tuple[int, int, int, int]],
                    fills: List[Tuple[int, torch.Tensor]]) -> None:
        """Write a float32 tensor of ``shape`` without materialising it: the file is laid out by
        ``torch.save`` with its data left as a hole (zeros), then ``copies`` (``(path, offset, nbytes,
        output byte offset)``, from :meth:`CheckpointView.flat_sources`) are copied file-to-file
        with ``copy_file_range`` and ``fills`` (``(output element offset, tensor)``) written in place.
        Regions covered by neither stay zero."""
        folder = os.path.join(self.root, name)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{key}.pt")
        placeholder = torch.empty(shape, dtype=torch.float32)  # never touched: no memory is used
        with open(path, "wb") as f, _no_zip_crc(), torch.serialization.skip_data():
            torch.save(placeholder, f)
        data_offset = int(torch._C.PyTorchFileReader(path).get_record_offset("data/0"))
        fd = os.open(path, os.O_WRONLY)
        sources: Dict[str, int] = {}
        try:
            for src_path, src_off, nbytes, out_off in copies:
                if src_path not in sources:
                    sources[src_path] = os.open(src_path, os.O_RDONLY)
                _copy_range(sources[src_path], src_off, fd, data_offset + out_off, nbytes)
            for elem, tensor in fills:
                view = memoryview(tensor.detach().to(torch.float32).contiguous().view(torch.uint8).numpy())
                pos, done = data_offset + elem * 4, 0
                while done < len(view):
                    done += os.pwrite(fd, view[done:done + (1 << 30)], pos + done)
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
            for src in sources.values():
                os.close(src)
        self.bytes_written += int(math.prod(shape)) * 4

    def finish(self, meta: Dict[str, Any]) -> None:
        files.write_json(os.path.join(self.step_dir, files.META_FILE), meta)


def _copy_range(src_fd: int, src_off: int, dst_fd: int, dst_off: int, nbytes: int) -> None:
    """Copy bytes between files in the kernel (copy_file_range), falling back to pread/pwrite."""
    done = 0
    use_kernel = hasattr(os, "copy_file_range")
    while done < nbytes:
        chunk = min(nbytes - done, 1 << 30)
        n = 0
        if use_kernel:
            try:
                n = os.copy_file_range(src_fd, dst_fd, chunk, src_off + done, dst_off + done)
            except OSError:
                use_kernel = False
        if not use_kernel:
            data = os.pread(src_fd, min(chunk, 64 << 20), src_off + done)
            n = os.pwrite(dst_fd, data, dst_off + done) if data else 0
        if n <= 0:
            raise CheckpointFormatError(f"short copy: {nbytes - done} bytes could not be read from a source file")
        done += n


@contextlib.contextmanager
def _no_zip_crc():
    """torch.save without the zip CRC32 of the data (5x faster on large tensors; torch.load and
    :class:`~.tensor_file.TorchFile` do not need it). A no-op on torch versions without the switch."""
    try:
        from torch.utils.serialization import config
        save_config = config.save
        old = save_config.compute_crc32
    except (ImportError, AttributeError):
        yield
        return
    save_config.compute_crc32 = False
    try:
        yield
    finally:
        save_config.compute_crc32 = old


def copy_if_exists(src: str, dst: str) -> bool:
    if os.path.isfile(src):
        shutil.copyfile(src, dst)
        return True
    return False
