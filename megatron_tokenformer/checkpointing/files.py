"""Checkpoint folder layout, the project metadata file, and crash-safe publication.

A save directory (``--save``) looks like DeepSpeed's::

    latest                          text: the tag of the newest COMPLETE step folder
    global_step<N>/                 one complete step (DeepSpeed files + the files below)
        tokenformer_checkpoint.json project metadata (model config, arguments, layout, samples)
        tokenizer.model             copy of the tokenizer model, when training used one
        tokenformer_rng_rank_<R>.pt every rank's RNG states (python, numpy, torch, TP tracker)
    global_step<N>.partial/         a save in progress (never read; removed by the next save)

Publication protocol (:func:`publish_step_dir`): every file of the step is written into
``global_step<N>.partial``, fsynced, the folder is renamed to ``global_step<N>`` and the parent
fsynced, and only then ``latest`` is replaced (write ``latest.tmp``, fsync, rename, fsync). A process
killed at any moment leaves ``latest`` naming the previous complete step.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Dict, List, Optional, Tuple

LATEST_FILE = "latest"
META_FILE = "tokenformer_checkpoint.json"
TOKENIZER_FILE = "tokenizer.model"
REPORT_FILE = "expansion_report.json"
CANONICAL_DIR = "canonical"
PARTIAL_SUFFIX = ".partial"
STEP_PREFIX = "global_step"
FORMAT_VERSION = 1

# "kind" in the metadata: how the tensors of the step folder are stored
KIND_DEEPSPEED = "deepspeed"    # written by training: DeepSpeed model/ZeRO files at the layout in "layout"
KIND_CANONICAL = "canonical"    # written by tools/expand_checkpoint.py: one full tensor per parameter

_STEP_RE = re.compile(r"^global_step(\d+)$")


def step_tag(iteration: int) -> str:
    return f"{STEP_PREFIX}{int(iteration)}"


def rng_file_name(global_rank: int) -> str:
    return f"tokenformer_rng_rank_{int(global_rank):05d}.pt"


# --------------------------------------------------------------------------- durability primitives
def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """Make a rename/creation inside ``path`` durable (no-op where directories cannot be fsynced)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """fsync every file and folder below ``path`` (and ``path`` itself)."""
    for root, dirs, files in os.walk(path):
        for name in files:
            fsync_file(os.path.join(root, name))
        fsync_dir(root)


def atomic_write_text(path: str, text: str) -> None:
    """Replace ``path`` by ``text`` atomically: readers see the old or the new content, never a mix."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_json(path: str, data: Dict[str, Any]) -> None:
    """Write JSON (sorted keys, indented) and fsync it (not atomic; used inside partial folders)."""
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=_json_default)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


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


# --------------------------------------------------------------------------- publishing and listing
def publish_step_dir(partial_dir: str, final_dir: str, fsync: bool = True) -> None:
    """fsync ``partial_dir`` and rename it to ``final_dir`` (replacing an older folder of that name)."""
    if fsync:
        fsync_tree(partial_dir)
    parent = os.path.dirname(os.path.abspath(final_dir))
    if os.path.exists(final_dir):
        # Same step saved again (e.g. after --finetune): move the old one aside first.
        old = final_dir + ".old"
        if os.path.exists(old):
            shutil.rmtree(old)
        os.replace(final_dir, old)
        os.replace(partial_dir, final_dir)
        fsync_dir(parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial_dir, final_dir)
    fsync_dir(parent)


def update_latest(save_dir: str, tag: str) -> None:
    atomic_write_text(os.path.join(save_dir, LATEST_FILE), tag + "\n")


def read_latest(load_dir: str) -> Optional[str]:
    """The tag ``latest`` names, or None when there is no ``latest`` file."""
    path = os.path.join(load_dir, LATEST_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        tag = f.read().strip()
    if not tag:
        raise ValueError(f"{path} is empty; expected the name of a step folder such as global_step100")
    return tag


def list_step_dirs(save_dir: str) -> List[Tuple[int, str]]:
    """Complete step folders (``global_step<N>`` with a metadata file), sorted by N."""
    out = []
    if not os.path.isdir(save_dir):
        return out
    for name in os.listdir(save_dir):
        m = _STEP_RE.match(name)
        if m and os.path.isfile(os.path.join(save_dir, name, META_FILE)):
            out.append((int(m.group(1)), name))
    return sorted(out)


def resolve_step_dir(load_dir: str, iteration: Optional[int] = None) -> Optional[str]:
    """The step folder to load: ``global_step<iteration>`` if given, else the one ``latest`` names.

    Returns None when ``iteration`` is None and there is no ``latest`` (nothing saved yet).
    Raises FileNotFoundError/ValueError naming the path when the folder is missing or incomplete.
    """
    if not os.path.isdir(load_dir):
        if iteration is None:
            return None
        raise FileNotFoundError(f"checkpoint directory {load_dir} does not exist")
    if iteration is not None:
        tag = step_tag(iteration)
        if not os.path.isdir(os.path.join(load_dir, tag)):
            available = ", ".join(str(n) for n, _ in list_step_dirs(load_dir)) or "none"
            raise FileNotFoundError(f"{os.path.join(load_dir, tag)} does not exist "
                                    f"(complete iterations in {load_dir}: {available})")
    else:
        tag = read_latest(load_dir)
        if tag is None:
            return None
    step_dir = os.path.join(load_dir, tag)
    if not os.path.isdir(step_dir):
        raise FileNotFoundError(f"{os.path.join(load_dir, LATEST_FILE)} names {tag}, but {step_dir} does not exist")
    if not os.path.isfile(os.path.join(step_dir, META_FILE)):
        raise ValueError(f"{step_dir} has no {META_FILE}: not a complete megatron_tokenformer checkpoint "
                         "(written by another program, or an interrupted save)")
    return step_dir


def read_meta(step_dir: str) -> Dict[str, Any]:
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


def remove_stale_partials(save_dir: str) -> None:
    """Delete ``*.partial`` step folders left by an interrupted save (rank 0, before a new save)."""
    if not os.path.isdir(save_dir):
        return
    for name in os.listdir(save_dir):
        if name.startswith(STEP_PREFIX) and (name.endswith(PARTIAL_SUFFIX) or name.endswith(".old")):
            shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)


def prune_checkpoints(save_dir: str, keep_last_n: int) -> List[str]:
    """Delete all but the newest ``keep_last_n`` complete step folders; never the one ``latest`` names.

    Returns the deleted folder names.
    """
    if keep_last_n is None or keep_last_n < 1:
        return []
    latest = read_latest(save_dir)
    steps = list_step_dirs(save_dir)
    doomed = [name for _, name in steps[:-keep_last_n] if name != latest]
    for name in doomed:
        # Rename first so a crash mid-delete never leaves a half-deleted folder that looks complete.
        path = os.path.join(save_dir, name)
        trash = path + ".old"
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    if doomed:
        fsync_dir(save_dir)
    return doomed
