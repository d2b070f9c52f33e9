"""Read a Hugging Face folder written by :mod:`.hf_export` back into a checkpoint of this system
(``tools/import_checkpoint.py --format hf``): the tensors are copied as they are (fp32 exports give
bitwise-identical tensors), the model config comes from ``config.json``, the tokenizer from
``tokenizer.json``."""

from __future__ import annotations

import json
import os
from typing import Dict, Optional

import torch

from megatron_tokenformer.errors import TokenformerError
from megatron_tokenformer.fileio import check_outputs_apart
from megatron_tokenformer.interop.hf_export import HF_PREFIX, SAFETENSORS_FILE, SAFETENSORS_INDEX

__all__ = ["HFImportError", "read_hf_folder", "import_hf"]


class HFImportError(TokenformerError, ValueError):
    """Bad input (names the flag, file or key); nothing was written."""


def _config_from_hf(cfg: Dict[str, object], path: str):
    from megatron_tokenformer.config import ModelConfig

    ours = cfg.get("megatron_tokenformer_config")
    if not isinstance(ours, dict):
        raise HFImportError(f"--input {path}: config.json has no megatron_tokenformer_config (not a folder written "
                            "by tools/export_hf.py)")
    try:
        return ModelConfig.from_dict(dict(ours)).validate()
    except ValueError as exc:
        raise HFImportError(f"--input {path}/config.json: {exc}") from None


def read_hf_folder(path: str):
    """(our model config, canonical name -> tensor) of an exported folder."""
    from safetensors.torch import load_file

    if not os.path.isdir(path):
        raise HFImportError(f"--input {path}: no such directory")
    cfg_path = os.path.join(path, "config.json")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise HFImportError(f"--input {path}: no config.json") from None
    except json.JSONDecodeError as exc:
        raise HFImportError(f"--input {cfg_path}: not JSON ({exc})") from None
    config = _config_from_hf(cfg, path)
    single, index = os.path.join(path, SAFETENSORS_FILE), os.path.join(path, SAFETENSORS_INDEX)
    if os.path.isfile(single):
        names = [single]
    elif os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map", {})
        names = sorted({os.path.join(path, v) for v in weight_map.values()})
    else:
        raise HFImportError(f"--input {path}: no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}")
    tensors: Dict[str, torch.Tensor] = {}
    for name in names:
        if not os.path.isfile(name):
            raise HFImportError(f"--input {path}: the index names {os.path.basename(name)}, which is missing")
        try:
            part = load_file(name)
        except Exception as exc:  # noqa: BLE001 - corrupt file: one line
            raise HFImportError(f"--input {name}: not a safetensors file ({str(exc).strip()[:200]})") from None
        for key, t in part.items():
            if not key.startswith(HF_PREFIX):
                raise HFImportError(f"tensor {key} in {name}: not a parameter of this model (expected {HF_PREFIX}...)")
            tensors[key[len(HF_PREFIX):]] = t
    return config, tensors


def import_hf(input_path: str, save: str, layout: Optional[Dict[str, int]] = None, log=print) -> str:
    from megatron_tokenformer.interop.checkpoint_format import write_checkpoint

    config, tensors = read_hf_folder(input_path)
    tok = os.path.join(input_path, "tokenizer.json")
    layout = dict(layout or {})
    tp = layout.setdefault("tensor_model_parallel_size", 1)
    pp = layout.setdefault("pipeline_model_parallel_size", 1)
    layout.setdefault("data_parallel_size", 1)
    try:
        config.validate(tp, pp)
    except ValueError as exc:
        raise HFImportError(f"the target layout cannot hold this model: {exc}") from None
    check_outputs_apart([("--save", save)], [("--input", input_path)])  # never written where read
    try:
        step = write_checkpoint(save, config, tensors, {"tokenizer_type": "HuggingFaceTokenizer" if os.path.isfile(tok)
                                                        else "NullTokenizer", "seq_length": config.seq_length},
                                tokenizer_file=tok if os.path.isfile(tok) else None,
                                source={"format": "hf", "input": os.path.abspath(input_path)}, layout=layout)
    except ValueError as exc:
        raise HFImportError(f"--input {input_path}: {exc}") from None
    log(f"imported {input_path} into {step}")
    return step
