"""The one place interop code touches the checkpoint format (a small adapter, so the storage code
can move without touching importers/exporters).

* :func:`open_step` -> a layout-independent view of any checkpoint (``CheckpointView``: full fp32
  tensors under canonical names, vocabulary padding trimmed, ``.config``, ``.meta``).
* :func:`check_torch_file` -> the checkpoint files' check (structure, allowed pickle globals) for a
  file read with ``torch.load``.
* :func:`write_checkpoint` -> a normal ``canonical`` checkpoint of this system (loadable at any
  TP/PP/DP by ``pretrain_tokenformer.py --load``, ``evaluate_checkpoint.py``, ``expand_checkpoint.py``),
  written into a staging folder and renamed into place: nothing half-written on error.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Dict, Optional, Tuple

import torch

from megatron_tokenformer.checkpointing.format import files, metadata
from megatron_tokenformer.checkpointing.format.canonical import CanonicalWriter
from megatron_tokenformer.checkpointing.format.entries import FP32, ParamEntry
from megatron_tokenformer.checkpointing.format.view import CheckpointView
from megatron_tokenformer.fileio import replace_dir

__all__ = ["open_step", "write_checkpoint", "parameter_layout", "check_torch_file", "FP32", "TOKENIZER_FILE"]

TOKENIZER_FILE = files.TOKENIZER_FILE


def open_step(load_dir: str, iteration: Optional[int] = None) -> CheckpointView:
    """The view of ``load_dir``'s step ``iteration`` (default: ``latest``); errors name ``--load``."""
    if not os.path.isdir(load_dir):
        raise FileNotFoundError(f"--load {load_dir}: no such directory")
    step_dir = files.resolve_step_dir(load_dir, iteration)
    if step_dir is None:
        raise FileNotFoundError(f"--load {load_dir} has no `latest` file (nothing saved there); pass --iteration N")
    return CheckpointView(step_dir)


def check_torch_file(path: str) -> Optional[str]:
    """None when ``path`` (a torch.save file) is complete and its pickle names only the globals a
    checkpoint holds; else the problem, one line naming the file (and the refused global). Run it before
    any ``torch.load(weights_only=False)``: the check runs nothing of the file."""
    from megatron_tokenformer.checkpointing.file_checks import check_file
    return check_file(path)


def parameter_layout(config) -> Dict[str, Tuple[Tuple[int, ...], Optional[int], bool]]:
    """canonical name -> (full shape with the vocabulary trimmed, TP partition dim or None, is-vocab)
    of the model ``config`` describes (built once on the meta device, TP = PP = 1)."""
    from megatron_tokenformer.model import GPTModel
    from megatron_tokenformer.model.naming import vocab_parameters

    with torch.device("meta"):
        model = GPTModel(config)
    vocab = vocab_parameters(model)
    out = {}
    for name, p in model.named_parameters():
        pdim = int(getattr(p, "partition_dim", 0)) if getattr(p, "tensor_model_parallel", False) else None
        shape = tuple(p.shape)
        if id(p) in vocab:
            shape = (config.vocab_size,) + shape[1:]
        out[name] = (shape, pdim, id(p) in vocab)
    return out


def write_checkpoint(save: str, config, tensors: Dict[str, torch.Tensor], args: Dict[str, Any],
                     tokenizer_file: Optional[str] = None, source: Optional[Dict[str, Any]] = None,
                     layout: Optional[Dict[str, int]] = None, iteration: int = 0) -> str:
    """Write ``tensors`` (canonical name -> full fp32 tensor, vocabulary rows = ``config.vocab_size``)
    as a canonical checkpoint at ``save`` (must not exist or be empty). Returns the step folder.

    The tensors must be exactly the model's parameters with the model's shapes (checked; the
    ValueError names the key). No optimizer state: training continues from it with a fresh optimizer.
    """
    from megatron_tokenformer.checkpointing.format.metadata import build_meta

    layout_map = parameter_layout(config)
    missing = sorted(set(layout_map) - set(tensors))
    extra = sorted(set(tensors) - set(layout_map))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"missing parameter {missing[0]}{more}")
    if extra:
        raise ValueError(f"unexpected parameter {extra[0]}")
    for name, (shape, _, _) in layout_map.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{name}: shape {list(tensors[name].shape)} does not match the model's {list(shape)}")
    save = os.path.abspath(save)
    if os.path.exists(save) and (not os.path.isdir(save) or os.listdir(save)):
        raise FileExistsError(f"--save {save} exists and is not empty; nothing written")
    layout = dict(layout or {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
                             "data_parallel_size": 1})
    layout.setdefault("world_size", layout["tensor_model_parallel_size"] * layout["pipeline_model_parallel_size"]
                      * layout["data_parallel_size"])
    tag = files.step_tag(iteration)
    with replace_dir(save) as staging:
        partial_step = os.path.join(staging, tag + files.PARTIAL_SUFFIX)
        os.makedirs(partial_step)
        writer = CanonicalWriter(partial_step)
        entries = []
        for name, (shape, pdim, vocab) in layout_map.items():
            writer.write(name, FP32, tensors[name].detach().to(torch.float32).contiguous())
            entries.append(ParamEntry(name, shape, config.params_dtype, pdim, vocab, None))
        has_tok = bool(tokenizer_file) and os.path.isfile(tokenizer_file)
        if has_tok:
            shutil.copyfile(tokenizer_file, os.path.join(partial_step, files.TOKENIZER_FILE))
        meta = build_meta(metadata.KIND_CANONICAL, config, dict(args), layout, iteration, 0,
                          tokenizer_file if has_tok else None, has_tok)
        meta["params"] = [e.to_dict() for e in entries]
        meta["optimizer_state_keys"] = []
        meta["training_state"] = {"iteration": iteration, "consumed_samples": 0}
        if source is not None:
            meta["source"] = source
        writer.finish(meta)
        files.publish_step_dir(partial_step, os.path.join(staging, tag))
        files.update_latest(staging, tag)
    return os.path.join(save, tag)
