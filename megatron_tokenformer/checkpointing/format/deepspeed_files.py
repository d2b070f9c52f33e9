"""DeepSpeed's on-disk checkpoint files, read as plain functions (no DeepSpeed import).

A ``deepspeed`` step folder (written by training at layout (tp, pp, dp)) holds, for every
model-parallel rank ``m = pp_stage * tp + tp_rank``:

* ``mp_rank_<m>_model_states.pt``: DeepSpeed's model file. Its client state ``"tokenformer"`` (written
  by :func:`~megatron_tokenformer.checkpointing.io.save_checkpoint`) maps each local parameter to its
  canonical name, local shape, dtype and TP partition dimension; it also holds the LR scheduler
  state and DeepSpeed's step counters. With ZeRO-0 the fp32 weights (``module``) and the torch
  optimizer state (``optimizer``) are in this file too.
* ``zero_pp_rank_<d>_mp_rank_<m>_optim_states.pt`` (``bf16_zero_pp_rank_...`` in bf16 runs), one per
  data-parallel rank ``d`` with ZeRO-1/2: the flat fp32 partitions and Adam moments of each
  parameter group; ``param_slice_mappings`` gives each parameter's fragment in them.

A parameter's local tensor on TP rank r is the concatenation of its fragments over d = 0..dp-1;
the full tensor is the local tensors of r = 0..tp-1 joined along its partition dimension.
With ZeRO-0 the weights are the model file's ``module`` (PP = 1) or, with PP > 1, DeepSpeed's
``layer_<i>-model_<t>-model_states.pt`` (pipeline layer ``i``, tensor rank ``t``; the tied embedding,
which DeepSpeed skips there, is in the client state). :func:`index_deepspeed_step` returns a
:class:`~.entries.CheckpointIndex` of lazily-read fragments.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from megatron_tokenformer.checkpointing.format.entries import (
    FP32,
    CheckpointFormatError,
    CheckpointIndex,
    Fragment,
    LocalTensor,
    ParamEntry,
)
from megatron_tokenformer.checkpointing.format.files import META_FILE
from megatron_tokenformer.checkpointing.format.metadata import jsonable
from megatron_tokenformer.checkpointing.format.tensor_file import LazyTensor, TorchFile, materialize
from megatron_tokenformer.checkpointing.optimizer_step import get_adam_step

__all__ = ["CLIENT_STATE_KEY", "model_states_file", "layer_file", "zero_shard_names", "zero_shard_file",
           "index_deepspeed_step"]

# the key of the project's entry in DeepSpeed's client state (the parameter map)
CLIENT_STATE_KEY = "tokenformer"


def model_states_file(step_dir: str, mp_rank: int) -> str:
    """DeepSpeed's model file of model-parallel rank ``mp_rank``."""
    return os.path.join(step_dir, f"mp_rank_{mp_rank:02d}_model_states.pt")


def layer_file(step_dir: str, layer: int, tp_rank: int) -> str:
    """DeepSpeed's file of pipeline layer ``layer`` on tensor rank ``tp_rank`` (PP > 1, ZeRO-0); the name
    follows the topology's (pipe, data, model) axes without pipe and data."""
    return os.path.join(step_dir, f"layer_{layer:02d}-model_{tp_rank:02d}-model_states.pt")


def zero_shard_names(step_dir: str, dp_rank: int, mp_rank: int) -> Tuple[str, str]:
    """The two names DeepSpeed gives a ZeRO-1/2 optimizer shard (fp32/fp16 runs, bf16 runs)."""
    name = f"zero_pp_rank_{dp_rank}_mp_rank_{mp_rank:02d}_optim_states.pt"
    return os.path.join(step_dir, name), os.path.join(step_dir, "bf16_" + name)


def zero_shard_file(step_dir: str, dp_rank: int, mp_rank: int) -> Optional[str]:
    """The ZeRO shard of (dp_rank, mp_rank) that exists, or None."""
    for path in zero_shard_names(step_dir, dp_rank, mp_rank):
        if os.path.isfile(path):
            return path
    return None


def _existing(path: str) -> str:
    if not os.path.isfile(path):
        raise CheckpointFormatError(f"missing checkpoint file {path}")
    return path


def index_deepspeed_step(step_dir: str, meta: Dict[str, Any], open_file: Callable[[str], TorchFile]) -> CheckpointIndex:
    """Index a ``deepspeed`` step folder (module docstring) from its files, without reading tensor data.

    ``meta``: the folder's metadata (:func:`~.metadata.read_meta`); ``open_file(path)``: opens a
    :class:`~.tensor_file.TorchFile` (the caller closes them). Raises :class:`CheckpointFormatError`
    naming the file for a missing shard, a foreign file, or fragments that do not add up.
    """
    lay = dict(meta.get("layout", {}))
    try:
        tp, pp, dp = (int(lay["tensor_model_parallel_size"]), int(lay["pipeline_model_parallel_size"]),
                      int(lay["data_parallel_size"]))
    except KeyError as exc:
        raise CheckpointFormatError(f"{step_dir}/{META_FILE}: layout lacks {exc}") from None
    zero_stage = int(lay.get("zero_stage", 0))
    vocab_size = int(meta.get("model_config", {}).get("vocab_size", 0))
    # canonical name -> {tp_rank -> (local shape, entry dict)}; first pipeline stage that has it wins
    found: "OrderedDict[str, Dict[int, Tuple[Tuple[int, ...], dict, int]]]" = OrderedDict()
    per_mp_locals: Dict[Tuple[int, str], Dict[str, LocalTensor]] = {}
    steps: Dict[str, float] = {}
    state_keys: Optional[List[str]] = None
    training_state: Dict[str, Any] = {}

    for m in range(tp * pp):
        stage, tp_rank = divmod(m, tp)
        model_path = model_states_file(step_dir, m)
        mf = open_file(_existing(model_path))
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
                "lr_scheduler": jsonable(materialize(sd.get("lr_scheduler"))),
            }
        param_list = cs["params"]
        local_by_name: Dict[str, Dict[str, LocalTensor]] = {}
        for p in param_list:
            shape = tuple(int(s) for s in p["shape"])
            local_by_name[p["name"]] = {}
            canon = p["canonical"]
            slot = found.setdefault(canon, {})
            if tp_rank not in slot:
                slot[tp_rank] = (shape, p, m)
        if zero_stage >= 1:
            keys = _index_zero_shards(step_dir, open_file, m, dp, param_list, local_by_name, steps,
                                       training_state, model_path)
            _fill_frozen(sd, param_list, local_by_name, keys)
        else:
            keys = _index_stage0(step_dir, open_file, lay, m, tp_rank, sd, cs, param_list, local_by_name, steps,
                                 model_path)
        if state_keys is None:
            state_keys = keys
        elif keys != state_keys:
            raise CheckpointFormatError(f"{step_dir}: optimizer state keys differ between model-parallel "
                                        f"ranks ({state_keys} vs {keys})")
        for name, per_key in local_by_name.items():
            per_mp_locals[(m, name)] = per_key

    index = CheckpointIndex(state_keys=list(state_keys or []), training_state=training_state)
    for canon, slot in found.items():
        ranks = sorted(slot)
        shape0, p0, _ = slot[ranks[0]]
        pdim = p0.get("partition_dim")
        if pdim is None:
            ranks = ranks[:1]
        elif ranks != list(range(tp)):
            raise CheckpointFormatError(f"{step_dir}: parameter {canon} is missing on tensor ranks "
                                        f"{sorted(set(range(tp)) - set(ranks))}")
        full = list(shape0)
        if pdim is not None:
            full[pdim] = sum(slot[r][0][pdim] for r in ranks)
        is_vocab = bool(p0.get("vocab", False))
        if is_vocab:
            if pdim != 0:
                raise CheckpointFormatError(f"{canon}: a vocabulary parameter must be partitioned along dim 0")
            full[0] = vocab_size
        per_key: Dict[str, List[LocalTensor]] = {}
        for key in [FP32] + index.state_keys:
            lst = []
            for r in ranks:
                shape, p, m = slot[r]
                local = per_mp_locals[(m, p["name"])].get(key)
                if local is None:
                    raise CheckpointFormatError(f"{step_dir}: no {key} for {p['name']} on model-parallel "
                                                f"rank {m}")
                local.check(f"{step_dir}: {key} of {p['name']} (model-parallel rank {m})")
                lst.append(local)
            per_key[key] = lst
        index.locals[canon] = per_key
        step = steps.get(f"{slot[ranks[0]][2]}/{p0['name']}")
        index.params[canon] = ParamEntry(canon, tuple(full), p0.get("dtype", "float32"), pdim, is_vocab, step)
    return index


def _index_zero_shards(step_dir, open_file, m, dp, param_list, local_by_name, steps, training_state,
                       model_path) -> List[str]:
    shapes = {p["name"]: tuple(int(s) for s in p["shape"]) for p in param_list}
    keys: Optional[List[str]] = None
    for d in range(dp):
        path = zero_shard_file(step_dir, d, m)
        if path is None:
            raise CheckpointFormatError(f"missing ZeRO shard {zero_shard_names(step_dir, d, m)[0]} (the layout says "
                                        f"data_parallel_size={dp})")
        zf = open_file(path)
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
                    local = per_key.setdefault(key, LocalTensor(shapes[name]))
                    pos = sum(f.numel for f in local.fragments)
                    if start + numel > src.numel():
                        raise CheckpointFormatError(f"{path}: fragment of {name} [{start}, {start + numel}) "
                                                    f"exceeds its partition ({src.numel()} elements)")
                    local.fragments.append(Fragment(pos, numel, src, start))
                if step is not None:
                    steps[f"{m}/{name}"] = step
    return list(keys or [])


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
        per_key[FP32] = LocalTensor(shape, [Fragment(0, t.numel(), t, 0)])
        for key in state_keys:
            per_key[key] = LocalTensor(shape, [Fragment(0, t.numel(), _Zeros(t.numel()), 0)])


def _layer_weights(step_dir, open_file, tp_rank, cs, param_list, model_path) -> Dict[str, Any]:
    """A pipeline stage's weights with ZeRO-0: DeepSpeed's layer files (``<layer>.<name>`` is ``<name>`` in
    :func:`layer_file` of that layer), the tied embedding from the client state (layer files skip it)."""
    tied = cs.get("tied_weights") or {}
    layers: Dict[str, Any] = {}
    out = {}
    for p in param_list:
        name = p["name"]
        if name.startswith("tied_modules."):
            if name not in tied:
                raise CheckpointFormatError(f"{model_path}: the tied weight {name} is not in the client state")
            out[name] = tied[name]
            continue
        layer, _, key = name.partition(".")
        if not layer.isdigit():
            raise CheckpointFormatError(f"{model_path}: {name} is neither a pipeline layer's nor a tied parameter")
        path = layer_file(step_dir, int(layer), tp_rank)
        if path not in layers:
            layers[path] = open_file(_existing(path)).obj
        state = layers[path]
        out[name] = state.get(key) if isinstance(state, dict) else None
    return out


def _index_stage0(step_dir, open_file, layout, m, tp_rank, sd, cs, param_list, local_by_name, steps,
                  model_path) -> List[str]:
    if layout.get("precision", "fp32") != "fp32":
        raise CheckpointFormatError(f"{model_path}: ZeRO stage 0 with {layout.get('precision')} is not "
                                    "supported by the resharding path; train with --zero-stage 1")
    module = sd.get("module")
    if module is None:  # a pipeline engine: the weights are in the layer files
        module = _layer_weights(step_dir, open_file, tp_rank, cs, param_list, model_path)
    opt = sd.get("optimizer")
    groups = cs.get("optimizer_groups")
    shapes = {p["name"]: tuple(int(s) for s in p["shape"]) for p in param_list}
    keys: List[str] = []
    for p in param_list:
        t = module.get(p["name"])
        if not isinstance(t, LazyTensor):
            raise CheckpointFormatError(f"{model_path}: module has no tensor {p['name']}")
        local_by_name[p["name"]][FP32] = LocalTensor(shapes[p["name"]], [Fragment(0, t.numel(), t, 0)])
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
                    local_by_name[name][k] = LocalTensor(shapes[name], [Fragment(0, st[k].numel(), st[k], 0)])
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
            out[attr] = jsonable(getattr(scaler, attr))
    return out

