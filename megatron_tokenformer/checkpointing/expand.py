"""Convert a checkpoint to another parallel layout and/or a grown model (tools/expand_checkpoint.py).

Runs in one process without GPUs or process groups, on any checkpoint the project writes (also one
written by 64 ranks: the view reads their files directly). The output is a ``canonical`` step folder
(:mod:`.format.canonical`): one full tensor per parameter and optimizer state, with the target layout,
the (grown) model config, the training state and an ``expansion_report.json``; training loads it
at the target layout through :func:`~.io.load_checkpoint`'s resharding path.

Memory: one tensor at a time. For each parameter and each key (fp32 master, exp_avg, exp_avg_sq)
the target file is laid out by ``torch.save`` with its data left as a hole, the source fragments
are copied into it file-to-file (``copy_file_range``: no user-space copy), the new rows of a grown
tensor are written in place (random values; zeros stay holes), and the file is fsynced. Only the
new random rows are ever in memory. Where bytes cannot be copied as they are (a partition
dimension other than 0, a non-fp32 source), the full tensor is assembled with ``pread`` and saved:
about 2x the largest full tensor. Either way memory does not grow with the model.

The conversion is a pipeline of named steps (:func:`expand_checkpoint`): :func:`read_source` ->
:func:`grow_or_widen` -> :func:`reshard_to` -> :func:`write_canonical` -> :func:`log_written`, with
:func:`plan_tensors` / :func:`log_plan` for what a dry run prints.

Crash safety (:func:`megatron_tokenformer.fileio.replace_dir`): everything is written below
``<save>.partial-<pid>/``, fsynced, and renamed to ``<save>`` at the very end; any error before that
leaves ``<save>`` untouched (nothing half-written). ``no_fsync`` skips the fsyncs (faster on a scratch disk;
a machine crash right after the tool returns can then lose data the rename already published).
"""

from __future__ import annotations

import contextlib
import copy
import os
import resource
import shutil
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from megatron_tokenformer.checkpointing import save_dir
from megatron_tokenformer.checkpointing.format import files, metadata
from megatron_tokenformer.checkpointing.format.canonical import CanonicalWriter
from megatron_tokenformer.checkpointing.format.entries import FP32
from megatron_tokenformer.checkpointing.format.source import CheckpointSource
from megatron_tokenformer.checkpointing.format.view import CheckpointView
from megatron_tokenformer.checkpointing.grow import GrownView, plan_growth
from megatron_tokenformer.checkpointing.reshard import layout_tuple, target_layout
from megatron_tokenformer.errors import TokenformerError
from megatron_tokenformer.fileio import OverlapError, check_outputs_apart, replace_dir, staging_path
from megatron_tokenformer.model.spec import GROW_NET2NET_WIDTH, get_spec

__all__ = ["ExpandError", "ExpandOptions", "expand_checkpoint", "peak_rss_bytes", "read_source", "grow_or_widen",
           "reshard_to", "plan_tensors", "write_canonical"]


class ExpandError(TokenformerError, ValueError):
    """Bad request (flag named in the message); nothing was written."""


@dataclass
class ExpandOptions:
    load: str
    save: str
    iteration: Optional[int] = None
    target_tensor_model_parallel_size: Optional[int] = None
    target_pipeline_model_parallel_size: Optional[int] = None
    target_data_parallel_size: Optional[int] = None
    qkv_num_param_tokens: Optional[int] = None
    proj_num_param_tokens: Optional[int] = None
    ffn_num_param_tokens: Optional[int] = None
    param_token_growth_factor: Optional[float] = None
    num_layers: Optional[int] = None
    new_layer_positions: Optional[List[int]] = None
    new_value_std: Optional[float] = None
    seed: int = 1234
    reset_optimizer: bool = False
    reset_iteration: bool = False
    dry_run: bool = False
    overwrite: bool = False
    no_fsync: bool = False
    # Net2Net width growth of a --model-type transformer checkpoint (checkpointing/net2net.py)
    hidden_size: Optional[int] = None
    ffn_hidden_size: Optional[int] = None
    net2net_noise_std: float = 0.0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024.0
    return f"{n:.1f} TiB"


def _check_apart(opts: ExpandOptions) -> None:
    try:
        check_outputs_apart([("--save", opts.save)], [("--load", opts.load)])
    except OverlapError as exc:
        raise ExpandError(str(exc)) from None


def _content(folder: str) -> List[str]:
    """The entries of ``folder`` other than the --save lock's files."""
    return [n for n in os.listdir(folder) if not n.startswith(save_dir.LOCK_FILE)]


def _check_target(opts: ExpandOptions) -> None:
    _check_apart(opts)
    if os.path.exists(opts.save):
        if not os.path.isdir(opts.save):
            raise ExpandError(f"--save {opts.save} exists and is not a directory")
        if _content(opts.save) and not opts.overwrite:
            raise ExpandError(f"--save {opts.save} exists and is not empty; pass --overwrite to replace it")


@contextlib.contextmanager
def save_lock(opts: ExpandOptions, log: Callable[[str], None]) -> Iterator[save_dir.SaveDirLock]:
    """Hold the --save lock of training (:class:`~.save_dir.SaveDirLock`) while writing: a second
    expand_checkpoint.py, or a training run, on the same --save is refused naming the holder.

    Creates ``--save`` for the lock file; a ``--save`` created here is removed again when nothing was
    written. The lock file travels into the published folder (:func:`write_canonical`), still held.
    """
    _check_apart(opts)  # before creating anything
    save = os.path.abspath(opts.save)
    if os.path.exists(save) and not os.path.isdir(save):
        raise ExpandError(f"--save {opts.save} exists and is not a directory")
    created = not os.path.exists(save)
    try:
        os.makedirs(save, exist_ok=True)
    except OSError as exc:
        raise ExpandError(f"--save {opts.save} cannot be created: {save_dir.os_error_text(exc)}") from None
    lock = save_dir.SaveDirLock(save, log=log)
    had_lock_file = os.path.exists(lock.path)
    try:
        lock.acquire()
    except save_dir.SaveDirError as exc:
        if created:
            try:
                os.rmdir(save)
            except OSError:
                pass
        raise ExpandError(str(exc)) from None
    done = False
    try:
        yield lock
        done = True
    finally:
        if not had_lock_file:  # leave no lock file behind (held until the release below)
            lock.remove_lock_file()
        lock.release()
        if not done and created:
            try:
                os.rmdir(save)
            except OSError:
                pass


def _training_state(view: CheckpointView, grown: CheckpointSource, reset_iteration: bool) -> Dict[str, object]:
    ts = copy.deepcopy(view.training_state)
    ts.setdefault("iteration", view.iteration)
    ts.setdefault("consumed_samples", int(view.meta.get("consumed_samples", 0)))
    if reset_iteration:
        ts.update(iteration=0, consumed_samples=0, global_steps=0, global_samples=0, skipped_steps=0)
        if isinstance(ts.get("lr_scheduler"), dict) and "num_steps" in ts["lr_scheduler"]:
            ts["lr_scheduler"]["num_steps"] = 0
    if grown.reset_optimizer:
        ts["loss_scaler"] = None
    return ts


def _updated_args(view: CheckpointView, grown: CheckpointSource, layout: Dict[str, int]) -> Dict[str, object]:
    args = dict(view.meta.get("args", {}))
    cfg = grown.config
    for key in ("num_layers", "qkv_num_param_tokens", "proj_num_param_tokens", "ffn_num_param_tokens",
                "qkv_tau", "proj_tau", "ffn_tau", "hidden_size", "num_attention_heads", "ffn_hidden_size"):
        args[key] = getattr(cfg, key)
    args["tensor_model_parallel_size"] = layout["tensor_model_parallel_size"]
    args["pipeline_model_parallel_size"] = layout["pipeline_model_parallel_size"]
    args["data_parallel_size"] = layout["data_parallel_size"]
    return args


@dataclass
class TensorPlan:
    """What will be written: one row ``(name, key, old shape or None, new shape, bytes, how)`` per tensor."""

    rows: List[Tuple[str, str, Optional[Tuple[int, ...]], Tuple[int, ...], int, str]]
    total_in: int
    total_out: int

    @property
    def largest(self) -> int:
        return max((r[4] for r in self.rows), default=0)


# --------------------------------------------------------------------------- the steps
def read_source(opts: ExpandOptions) -> CheckpointView:
    """Step 1: open the source step folder (``--load``, ``--iteration``); check ``--save`` first."""
    if not os.path.isdir(opts.load):
        raise ExpandError(f"--load {opts.load}: no such directory")
    step_dir = files.resolve_step_dir(opts.load, opts.iteration)
    if step_dir is None:
        raise ExpandError(f"--load {opts.load} has no `latest` file; pass --iteration N")
    if not opts.dry_run:
        _check_target(opts)
    return CheckpointView(step_dir)


def grow_or_widen(view: CheckpointView, opts: ExpandOptions) -> CheckpointSource:
    """Step 2: the source as the target model: a :class:`~.net2net.WidenedView` for a baseline
    Transformer or a width change, else a :class:`~.grow.GrownView` (token/depth growth, or none)."""
    try:
        if get_spec(view.config).growth_rule == GROW_NET2NET_WIDTH or opts.hidden_size is not None or \
                opts.ffn_hidden_size is not None:
            from megatron_tokenformer.checkpointing import net2net
            return net2net.WidenedView(view, net2net.plan_from_options(view.config, opts))
        plan = plan_growth(
            view.config, opts.qkv_num_param_tokens, opts.proj_num_param_tokens, opts.ffn_num_param_tokens,
            opts.param_token_growth_factor, opts.num_layers, opts.new_layer_positions, opts.new_value_std,
            opts.seed, opts.reset_optimizer)
        return GrownView(view, plan)
    except ValueError as exc:
        raise ExpandError(str(exc)) from None


def reshard_to(view: CheckpointView, opts: ExpandOptions) -> Dict[str, int]:
    """Step 3a: the target layout (``--target-*-size``; a size not given keeps the source's)."""
    try:
        return target_layout(view.layout, opts.target_tensor_model_parallel_size,
                             opts.target_pipeline_model_parallel_size, opts.target_data_parallel_size)
    except ValueError as exc:
        raise ExpandError(str(exc)) from None


def check_fits(source: CheckpointSource, view: CheckpointView, layout: Dict[str, int],
               log: Callable[[str], None]) -> None:
    """Step 3b: the target model must divide over the target layout; a batch-size note when it will not."""
    try:
        source.config.validate(layout["tensor_model_parallel_size"], layout["pipeline_model_parallel_size"])
    except ValueError as exc:
        raise ExpandError(f"the target does not fit the layout (--target-tensor-model-parallel-size "
                          f"{layout['tensor_model_parallel_size']}, --target-pipeline-model-parallel-size "
                          f"{layout['pipeline_model_parallel_size']}): {exc}") from None
    recorded = view.meta.get("args", {})  # the source run's flags
    gbs, mbs = recorded.get("global_batch_size"), recorded.get("micro_batch_size")
    if isinstance(gbs, int) and isinstance(mbs, int) and gbs % (mbs * layout["data_parallel_size"]):
        log(f"note: the source run's global batch {gbs} is not a multiple of micro batch {mbs} x target data "
            f"parallel size {layout['data_parallel_size']}; pass a matching --micro-batch-size when training")


def plan_tensors(view: CheckpointView, source: CheckpointSource) -> TensorPlan:
    """Every (parameter, key) to write, with its source shape, size and origin."""
    rows = []
    total_in = total_out = 0
    for name, entry in source.params.items():
        src = source.source_name(name)
        old_shape = tuple(view.params[src].shape) if src else None
        for key in source.keys:
            nbytes = entry.numel() * 4
            rows.append((name, key, old_shape, tuple(entry.shape), nbytes, source.describe(name)))
            total_out += nbytes
            if src is not None and (key == FP32 or key in view.state_keys):
                total_in += view.params[src].numel() * 4
    return TensorPlan(rows, total_in, total_out)


def log_plan(view: CheckpointView, source: CheckpointSource, layout: Dict[str, int], plan: TensorPlan,
             opts: ExpandOptions, log: Callable[[str], None]) -> None:
    log(f"source: {view.step_dir} ({view.kind}, iteration {view.iteration}, (tp, pp, dp) = "
        f"{layout_tuple(view.layout)})")
    log(f"target: {opts.save} (canonical, (tp, pp, dp) = {layout_tuple(layout)}); {len(source.params)} parameters "
        f"x {len(source.keys)} tensors ({', '.join(source.keys)}), {_human(plan.total_out)}; largest tensor "
        f"{_human(plan.largest)}")
    if opts.dry_run:
        for name, key, old_shape, new_shape, nbytes, how in plan.rows:
            old = "new" if old_shape is None else str(list(old_shape))
            log(f"  {name} [{key}]: {old} -> {list(new_shape)}  {nbytes} bytes  ({how})")
        log("dry run: nothing written")


def write_canonical(view: CheckpointView, source: CheckpointSource, layout: Dict[str, int], plan: TensorPlan,
                    opts: ExpandOptions, t0: float, lock: Optional[save_dir.SaveDirLock] = None) -> Dict[str, Any]:
    """Step 4: write the canonical step folder into a staging folder and swap it in as ``--save``.

    Returns the expansion report. Any error removes the staging folder (``--save`` untouched); an
    OS error (a full disk: ENOSPC) becomes one :class:`ExpandError` line naming the file.
    """
    save = os.path.abspath(opts.save)
    tag = files.step_tag(0 if opts.reset_iteration else view.iteration)
    fsync = not opts.no_fsync
    try:
        # the held lock's files move into the staging folder before the swap (a lock follows its inode):
        # the published folder stays locked by this process until it releases
        with replace_dir(save, fsync=fsync, carry=lock.files if lock is not None else ()) as staging:
            try:
                partial_step = os.path.join(staging, tag + files.PARTIAL_SUFFIX)
                os.makedirs(partial_step)
                writer = CanonicalWriter(partial_step, fsync=fsync)
                _write_tensors(source, writer)
                ts = _training_state(view, source, opts.reset_iteration)
                report = _report(view, source, layout, opts, save, tag, ts, writer.bytes_written, plan.largest)
                has_tok = _copy_tokenizer(view.step_dir, partial_step)
                meta = metadata.build_meta(metadata.KIND_CANONICAL, source.config, _updated_args(view, source, layout),
                                           layout, ts["iteration"], ts["consumed_samples"],
                                           view.meta.get("tokenizer", {}).get("source"), has_tok)
                meta["params"] = [e.to_dict() for e in source.params.values()]
                meta["optimizer_state_keys"] = list(source.state_keys)
                meta["training_state"] = ts
                meta["source"] = report["source"]
                report["seconds"] = round(time.time() - t0, 3)
                report["peak_rss_bytes"] = peak_rss_bytes()
                metadata.write_json(os.path.join(partial_step, files.REPORT_FILE), report)
                writer.finish(meta)
                files.publish_step_dir(partial_step, os.path.join(staging, tag), fsync=fsync)
                files.update_latest(staging, tag)
            except (OSError, RuntimeError) as exc:  # torch's writer reports a full disk as a RuntimeError
                raise _write_failed(exc, save, staging) from None
    except (OSError, RuntimeError) as exc:  # preparing the staging folder, or the swap
        raise _write_failed(exc, save, staging_path(save)) from None
    return report


def _write_failed(exc: BaseException, save: str, staging: str) -> ExpandError:
    """The one line of a failed write (described while ``staging`` still exists; it is removed next)."""
    cause = save_dir.describe_save_error(exc, staging)
    return ExpandError(f"writing --save {save} failed: {cause}; nothing was written (the partial output "
                       f"{staging} was removed)")


def log_written(report: Dict[str, Any], log: Callable[[str], None]) -> None:
    """Step 5: one line on what was written, how fast, at what peak memory."""
    log(f"wrote {report['target']['dir']}/{report['target']['step']}: {_human(report['bytes_written'])} in "
        f"{report['seconds']:.2f} s ({_human(report['bytes_written'] / max(report['seconds'], 1e-9))}/s), peak RSS "
        f"{_human(report['peak_rss_bytes'])}")


def expand_checkpoint(opts: ExpandOptions, log: Callable[[str], None] = print) -> Dict[str, object]:
    """Do (or with ``dry_run`` only plan) the conversion. Returns the expansion report.

    Raises :class:`ExpandError` / :class:`CheckpointFormatError` / FileNotFoundError with a message
    naming the flag or file; nothing is written in that case.
    """
    t0 = time.time()
    with contextlib.ExitStack() as stack:
        lock = None if opts.dry_run else stack.enter_context(save_lock(opts, log))  # [save_dir] one writer
        view = stack.enter_context(read_source(opts))
        layout = reshard_to(view, opts)
        source = grow_or_widen(view, opts)
        check_fits(source, view, layout, log)
        plan = plan_tensors(view, source)
        log_plan(view, source, layout, plan, opts, log)
        if opts.dry_run:
            return {"dry_run": True, "tensors": len(plan.rows), "bytes": plan.total_out,
                    "largest_tensor_bytes": plan.largest}
        report = write_canonical(view, source, layout, plan, opts, t0, lock)
        log_written(report, log)
        return report


# --------------------------------------------------------------------------- writing helpers
def _write_tensors(source: CheckpointSource, writer: CanonicalWriter) -> None:
    """Every (parameter, key): byte copies + new rows where the source can say where its bytes lie,
    else the tensor read whole (one at a time)."""
    for name, entry in source.params.items():
        for key in source.keys:
            parts = source.plan_parts(name, key)
            if parts is not None:
                writer.write_parts(name, key, tuple(entry.shape), *parts)
            else:
                writer.write(name, key, source.read(name, key))


def _report(view: CheckpointView, source: CheckpointSource, layout: Dict[str, int], opts: ExpandOptions, save: str,
            tag: str, ts: Dict[str, Any], bytes_written: int, largest: int) -> Dict[str, Any]:
    return {
        "source": {"dir": os.path.abspath(opts.load), "step_dir": view.step_dir, "kind": view.kind,
                   "iteration": view.iteration, "consumed_samples": view.training_state.get("consumed_samples"),
                   "layout": view.layout},
        "target": {"dir": save, "step": tag, "layout": layout, "iteration": ts["iteration"],
                   "consumed_samples": ts["consumed_samples"]},
        "growth": source.report(),
        "reset_iteration": opts.reset_iteration,
        "parameters": {name: {"shape": list(e.shape), "from": source.describe(name)}
                       for name, e in source.params.items()},
        "bytes_written": bytes_written,
        "largest_tensor_bytes": largest,
    }


def _copy_tokenizer(step_dir: str, dest_dir: str) -> bool:
    src = os.path.join(step_dir, files.TOKENIZER_FILE)
    if not os.path.isfile(src):
        return False
    shutil.copyfile(src, os.path.join(dest_dir, files.TOKENIZER_FILE))
    return True
