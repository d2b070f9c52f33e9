"""Convert a checkpoint to another parallel layout and/or a grown model (tools/expand_checkpoint.py).

Runs in one process without GPUs or process groups, on any checkpoint the project writes (also one
written by 64 ranks: the view reads their files directly). The output is a ``canonical`` step folder
(:mod:`.reshard`): one full tensor per parameter and optimizer state, with the target layout,
the (grown) model config, the training state and an ``expansion_report.json``; training loads it
at the target layout through :func:`~.io.load_checkpoint`'s resharding path.

Memory: one tensor at a time. For each parameter and each key (fp32 master, exp_avg, exp_avg_sq)
the target file is laid out by ``torch.save`` with its data left as a hole, the source fragments
are copied into it file-to-file (``copy_file_range``: no user-space copy), the new rows of a grown
tensor are written in place (random values; zeros stay holes), and the file is fsynced. Only the
new random rows are ever in memory. Where bytes cannot be copied as they are (a partition
dimension other than 0, a non-fp32 source), the full tensor is assembled with ``pread`` and saved:
about 2x the largest full tensor. Either way memory does not grow with the model.

Crash safety: everything is written below ``<save>.partial-<pid>/``, fsynced, and renamed to
``<save>`` at the very end; any error before that leaves ``<save>`` untouched (nothing
half-written). ``no_fsync`` skips the fsyncs (faster on a scratch disk; a machine crash right after
the tool returns can then lose data the rename already published).
"""

from __future__ import annotations

import copy
import os
import resource
import shutil
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from megatron_tokenformer.checkpointing import files
from megatron_tokenformer.checkpointing.grow import GrownView, plan_growth
from megatron_tokenformer.checkpointing.reshard import FP32, CanonicalWriter, CheckpointView
from megatron_tokenformer.model.spec import GROW_NET2NET_WIDTH, get_spec

__all__ = ["ExpandError", "ExpandOptions", "expand_checkpoint", "peak_rss_bytes"]


class ExpandError(ValueError):
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


def _is_within(path: str, parent: str) -> bool:
    path, parent = os.path.realpath(path), os.path.realpath(parent)
    return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


def _check_target(opts: ExpandOptions) -> None:
    if _is_within(opts.save, opts.load) or _is_within(opts.load, opts.save):
        raise ExpandError(f"--save {opts.save} overlaps the source --load {opts.load}; the source is never written to, "
                          "choose a separate directory")
    if os.path.exists(opts.save):
        if not os.path.isdir(opts.save):
            raise ExpandError(f"--save {opts.save} exists and is not a directory")
        if os.listdir(opts.save) and not opts.overwrite:
            raise ExpandError(f"--save {opts.save} exists and is not empty; pass --overwrite to replace it")


def _target_layout(view: CheckpointView, opts: ExpandOptions) -> Dict[str, int]:
    src = view.layout
    tp = opts.target_tensor_model_parallel_size or int(src.get("tensor_model_parallel_size", 1))
    pp = opts.target_pipeline_model_parallel_size or int(src.get("pipeline_model_parallel_size", 1))
    dp = opts.target_data_parallel_size or int(src.get("data_parallel_size", 1))
    for flag, value in (("--target-tensor-model-parallel-size", tp), ("--target-pipeline-model-parallel-size", pp),
                        ("--target-data-parallel-size", dp)):
        if value < 1:
            raise ExpandError(f"{flag} must be >= 1, got {value}")
    return {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp, "data_parallel_size": dp,
            "world_size": tp * pp * dp}


def _training_state(view: CheckpointView, grown: GrownView, reset_iteration: bool) -> Dict[str, object]:
    ts = copy.deepcopy(view.training_state)
    ts.setdefault("iteration", view.iteration)
    ts.setdefault("consumed_samples", int(view.meta.get("consumed_samples", 0)))
    if reset_iteration:
        ts.update(iteration=0, consumed_samples=0, global_steps=0, global_samples=0, skipped_steps=0)
        if isinstance(ts.get("lr_scheduler"), dict) and "num_steps" in ts["lr_scheduler"]:
            ts["lr_scheduler"]["num_steps"] = 0
    if grown.plan.reset_optimizer:
        ts["loss_scaler"] = None
    return ts


def _updated_args(view: CheckpointView, grown: GrownView, layout: Dict[str, int]) -> Dict[str, object]:
    args = dict(view.meta.get("args", {}))
    cfg = grown.config
    for key in ("num_layers", "qkv_num_param_tokens", "proj_num_param_tokens", "ffn_num_param_tokens",
                "qkv_tau", "proj_tau", "ffn_tau", "hidden_size", "num_attention_heads", "ffn_hidden_size"):
        args[key] = getattr(cfg, key)
    args["tensor_model_parallel_size"] = layout["tensor_model_parallel_size"]
    args["pipeline_model_parallel_size"] = layout["pipeline_model_parallel_size"]
    args["data_parallel_size"] = layout["data_parallel_size"]
    return args


def expand_checkpoint(opts: ExpandOptions, log: Callable[[str], None] = print) -> Dict[str, object]:
    """Do (or with ``dry_run`` only plan) the conversion. Returns the expansion report.

    Raises :class:`ExpandError` / :class:`CheckpointFormatError` / FileNotFoundError with a message
    naming the flag or file; nothing is written in that case.
    """
    t0 = time.time()
    if not os.path.isdir(opts.load):
        raise ExpandError(f"--load {opts.load}: no such directory")
    step_dir = files.resolve_step_dir(opts.load, opts.iteration)
    if step_dir is None:
        raise ExpandError(f"--load {opts.load} has no `latest` file; pass --iteration N")
    if not opts.dry_run:
        _check_target(opts)
    view = CheckpointView(step_dir)
    try:
        layout = _target_layout(view, opts)
        net2net_plan = None
        try:
            if get_spec(view.config).growth_rule == GROW_NET2NET_WIDTH or opts.hidden_size is not None or \
                    opts.ffn_hidden_size is not None:
                from megatron_tokenformer.checkpointing import net2net
                net2net_plan = net2net.plan_from_options(view.config, opts)
            plan = net2net_plan or plan_growth(
                view.config, opts.qkv_num_param_tokens, opts.proj_num_param_tokens, opts.ffn_num_param_tokens,
                opts.param_token_growth_factor, opts.num_layers, opts.new_layer_positions, opts.new_value_std,
                opts.seed, opts.reset_optimizer)
        except ValueError as exc:
            raise ExpandError(str(exc)) from None
        try:
            plan.new_config.validate(layout["tensor_model_parallel_size"], layout["pipeline_model_parallel_size"])
        except ValueError as exc:
            raise ExpandError(f"the target does not fit the layout (--target-tensor-model-parallel-size "
                              f"{layout['tensor_model_parallel_size']}, --target-pipeline-model-parallel-size "
                              f"{layout['pipeline_model_parallel_size']}): {exc}") from None
        grown = net2net.WidenedView(view, plan) if net2net_plan is not None else GrownView(view, plan)
        args = view.meta.get("args", {})
        gbs, mbs = args.get("global_batch_size"), args.get("micro_batch_size")
        if isinstance(gbs, int) and isinstance(mbs, int) and gbs % (mbs * layout["data_parallel_size"]):
            log(f"note: the source run's global batch {gbs} is not a multiple of micro batch {mbs} x target data "
                f"parallel size {layout['data_parallel_size']}; pass a matching --micro-batch-size when training")

        # ---- the plan
        rows = []
        total_in = total_out = 0
        for name, entry in grown.params.items():
            src = grown.source_name(name)
            old_shape = tuple(view.params[src].shape) if src else None
            for key in grown.keys:
                nbytes = entry.numel() * 4
                rows.append((name, key, old_shape, tuple(entry.shape), nbytes, grown.describe(name)))
                total_out += nbytes
                if src is not None and (key == FP32 or key in view.state_keys):
                    total_in += view.params[src].numel() * 4
        largest = max((r[4] for r in rows), default=0)
        src_layout = tuple(view.layout.get(k, 1) for k in ("tensor_model_parallel_size",
                                                           "pipeline_model_parallel_size", "data_parallel_size"))
        dst_layout = (layout["tensor_model_parallel_size"], layout["pipeline_model_parallel_size"],
                      layout["data_parallel_size"])
        log(f"source: {step_dir} ({view.kind}, iteration {view.iteration}, (tp, pp, dp) = {src_layout})")
        log(f"target: {opts.save} (canonical, (tp, pp, dp) = {dst_layout}); {len(grown.params)} parameters x "
            f"{len(grown.keys)} tensors ({', '.join(grown.keys)}), {_human(total_out)}; largest tensor "
            f"{_human(largest)}")
        if opts.dry_run:
            for name, key, old_shape, new_shape, nbytes, how in rows:
                old = "new" if old_shape is None else str(list(old_shape))
                log(f"  {name} [{key}]: {old} -> {list(new_shape)}  {nbytes} bytes  ({how})")
            log("dry run: nothing written")
            return {"dry_run": True, "tensors": len(rows), "bytes": total_out, "largest_tensor_bytes": largest}

        # ---- write
        save = os.path.abspath(opts.save)
        staging = f"{save}.partial-{os.getpid()}"
        if os.path.exists(staging):
            shutil.rmtree(staging)
        iteration = 0 if opts.reset_iteration else view.iteration
        tag = files.step_tag(iteration)
        partial_step = os.path.join(staging, tag + files.PARTIAL_SUFFIX)
        try:
            os.makedirs(partial_step)
            writer = CanonicalWriter(partial_step, fsync=not opts.no_fsync)
            done = 0
            plan_parts = getattr(grown, "plan_parts", None)
            for name in grown.params:
                for key in grown.keys:
                    parts = plan_parts(name, key) if plan_parts is not None else None
                    if parts is not None:   # byte-for-byte copies + the new rows: nothing materialised
                        writer.write_parts(name, key, tuple(grown.params[name].shape), *parts)
                    else:
                        tensor = grown.read(name, key)
                        writer.write(name, key, tensor)
                        del tensor
                done += 1
            ts = _training_state(view, grown, opts.reset_iteration)
            report = {
                "source": {"dir": os.path.abspath(opts.load), "step_dir": step_dir, "kind": view.kind,
                           "iteration": view.iteration, "consumed_samples": view.training_state.get("consumed_samples"),
                           "layout": view.layout},
                "target": {"dir": save, "step": tag, "layout": layout, "iteration": ts["iteration"],
                           "consumed_samples": ts["consumed_samples"]},
                "growth": grown.report(),
                "reset_iteration": opts.reset_iteration,
                "parameters": {name: {"shape": list(e.shape), "from": grown.describe(name)}
                               for name, e in grown.params.items()},
                "bytes_written": writer.bytes_written,
                "largest_tensor_bytes": largest,
            }
            has_tok = files.TOKENIZER_FILE if os.path.isfile(os.path.join(step_dir, files.TOKENIZER_FILE)) else None
            if has_tok:
                shutil.copyfile(os.path.join(step_dir, files.TOKENIZER_FILE),
                                os.path.join(partial_step, files.TOKENIZER_FILE))
            from megatron_tokenformer.checkpointing.io import build_meta
            meta = build_meta(files.KIND_CANONICAL, grown.config, _updated_args(view, grown, layout), layout,
                              ts["iteration"], ts["consumed_samples"],
                              view.meta.get("tokenizer", {}).get("source"), bool(has_tok))
            meta["params"] = [e.to_dict() for e in grown.params.values()]
            meta["optimizer_state_keys"] = list(grown.state_keys)
            meta["training_state"] = ts
            meta["source"] = report["source"]
            elapsed = time.time() - t0
            report["seconds"] = round(elapsed, 3)
            report["peak_rss_bytes"] = peak_rss_bytes()
            files.write_json(os.path.join(partial_step, files.REPORT_FILE), report)
            writer.finish(meta)
            files.publish_step_dir(partial_step, os.path.join(staging, tag), fsync=not opts.no_fsync)
            files.update_latest(staging, tag)
            files.fsync_dir(staging)
            # swap the staging folder in
            if os.path.exists(save):
                if os.listdir(save):
                    old = f"{save}.old-{os.getpid()}"
                    os.replace(save, old)
                    os.replace(staging, save)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.rmdir(save)
                    os.replace(staging, save)
            else:
                os.replace(staging, save)
            files.fsync_dir(os.path.dirname(save))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log(f"wrote {save}/{tag}: {_human(report['bytes_written'])} in {report['seconds']:.2f} s "
            f"({_human(report['bytes_written'] / max(report['seconds'], 1e-9))}/s), peak RSS "
            f"{_human(report['peak_rss_bytes'])}")
        return report
    finally:
        view.close()
