"""The project metadata file of a step folder (``tokenformer_checkpoint.json``): its schema.

Every step folder has one, whatever stores its tensors::

    format_version      1 (this module reads exactly this version)
    kind                "deepspeed" (written by training: DeepSpeed's files at ``layout``) or
                        "canonical" (written by tools/expand_checkpoint.py: one full tensor per file)
    iteration           optimizer steps taken
    consumed_samples    training samples consumed
    model_config        ModelConfig.to_dict() (tau included)
    args                the training flags (JSON-compatible copy)
    layout              tensor/pipeline/data parallel sizes, world size (+ zero_stage, precision)
    tokenizer           {"file": "tokenizer.model" or null, "source": path it was copied from}
    versions            torch, megatron_tokenformer, python (+ deepspeed when installed)
    saved_at            local time, ISO 8601
    optimizer           (training, since this field exists) {"class": the optimizer's class, "adam_step":
                        "param_group" (apex/DeepSpeed FusedAdam) or "parameter" (torch AdamW)}; absent in
                        older folders and canonical ones: the step is then wherever the saved state holds it
                        (checkpointing/optimizer_step.py)

``canonical`` folders add ``params`` (:class:`~.entries.ParamEntry` dicts), ``optimizer_state_keys``,
``training_state`` (iteration, samples, LR schedule state, loss scaler) and ``source``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Dict, Optional

from megatron_tokenformer.checkpointing.format.files import META_FILE, TOKENIZER_FILE
from megatron_tokenformer.fileio import durable_write

__all__ = ["FORMAT_VERSION", "KIND_DEEPSPEED", "KIND_CANONICAL", "build_meta", "read_meta", "write_json",
           "jsonable", "versions"]

FORMAT_VERSION = 1

# "kind" in the metadata: how the tensors of the step folder are stored
KIND_DEEPSPEED = "deepspeed"    # written by training: DeepSpeed model/ZeRO files at the layout in "layout"
KIND_CANONICAL = "canonical"    # written by tools/expand_checkpoint.py: one full tensor per parameter


def write_json(path: str, data: Dict[str, Any]) -> None:
    """Write JSON (sorted keys, indented) and fsync it (in place: used inside partial folders)."""
    with durable_write(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=_json_default)
        f.write("\n")


def _json_default(value):
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if hasattr(value, "item") and callable(value.item):
        try:
            return value.item()
        except (ValueError, RuntimeError):
            pass
    return repr(value)


def jsonable(value: Any) -> Any:
    """A JSON-compatible copy (numbers/strings/lists/dicts kept, everything else as repr)."""
    return json.loads(json.dumps(value, default=_json_default))


def versions() -> Dict[str, str]:
    """Versions of the software writing a checkpoint (deepspeed's from its package metadata, not imported)."""
    import megatron_tokenformer
    out = {"megatron_tokenformer": megatron_tokenformer.__version__, "python": sys.version.split()[0]}
    from importlib.metadata import PackageNotFoundError, version
    for package in ("torch", "deepspeed"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            pass
    if "torch" in sys.modules:  # the running torch (a source build's version is not in the metadata)
        out["torch"] = sys.modules["torch"].__version__
    return out


def build_meta(kind: str, config, args_dict: Dict[str, Any], layout: Dict[str, Any], iteration: int,
               consumed_samples: int, tokenizer_source: Optional[str], has_tokenizer: bool) -> Dict[str, Any]:
    """The metadata of a step folder (module docstring); ``config`` is a ModelConfig."""
    return {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "iteration": int(iteration),
        "consumed_samples": int(consumed_samples),
        "model_config": config.to_dict(),
        "args": args_dict,
        "layout": layout,
        "tokenizer": {"file": TOKENIZER_FILE if has_tokenizer else None, "source": tokenizer_source},
        "versions": versions(),
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def read_meta(step_dir: str) -> Dict[str, Any]:
    """The metadata of ``step_dir``; FileNotFoundError / ValueError naming the file when missing or unreadable."""
    path = os.path.join(step_dir, META_FILE)
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: {step_dir} is not a megatron_tokenformer checkpoint") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON ({exc})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta.get('format_version')!r} is not supported "
                         f"(this version reads {FORMAT_VERSION})")
    return meta
