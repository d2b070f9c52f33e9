"""The DeepSpeed adapter: saving and loading training checkpoints with the engine.

The format itself (folder layout, metadata, DeepSpeed's files, canonical folders) is in
:mod:`.format`, which does not import DeepSpeed; this module is what needs the engine. (Reconciling
the flags with a checkpoint before the model is built is the arguments layer's:
:mod:`megatron_tokenformer.checkpoint_args`.) Training calls two functions (contract
"Training <-> checkpointing"):

* :func:`save_checkpoint` (collective): DeepSpeed's files (model states, ZeRO shards, LR schedule,
  loss scaler) written into ``global_step<N>.partial``, plus every rank's RNG states and the
  project metadata (:mod:`.format.metadata`); the folder is fsynced and renamed, then ``latest`` replaced.
* :func:`load_checkpoint` (collective): resumes from the step ``latest`` names, or starts from
  scratch with a log line when there is none. A checkpoint written at the same layout is loaded by
  DeepSpeed itself (bitwise resume, RNG states included); any other layout, and the ``canonical``
  folders that tools/expand_checkpoint.py writes, go through the resharding path: every rank reads
  just its slice of every parameter and of its fp32 master weights and Adam moments from a
  :class:`~.format.view.CheckpointView` (:func:`~.reshard.param_slices`) and
  :func:`load_view_into_engine` places them in DeepSpeed's (ZeRO-partitioned) optimizer.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from megatron_tokenformer import deepspeed_boundary, parallel_state
from megatron_tokenformer.checkpointing import save_dir as save_dir_lib
from megatron_tokenformer.checkpointing.format import checksums, files, metadata
from megatron_tokenformer.checkpointing.format.deepspeed_files import CLIENT_STATE_KEY
from megatron_tokenformer.checkpointing.format.entries import FP32, CheckpointFormatError, CheckpointMismatchError
from megatron_tokenformer.checkpointing.format.metadata import build_meta
from megatron_tokenformer.checkpointing.format.tensor_file import TorchFile, materialize
from megatron_tokenformer.checkpointing.format.view import CheckpointView
from megatron_tokenformer.checkpointing.optimizer_step import (
    adam_step_conversion,
    describe_optimizer,
    saved_step_layout,
    set_adam_step,
)
from megatron_tokenformer.checkpointing.options import CheckpointOptions
from megatron_tokenformer.checkpointing.reshard import layout_tuple as _layout_tuple
from megatron_tokenformer.checkpointing.reshard import param_slices as _param_slices
from megatron_tokenformer.fileio import durable_write
from megatron_tokenformer.model.naming import canonical_parameter_names, vocab_parameters

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointMismatchError", "expand_command",
           "load_view_into_engine"]


# Config fields compared between the built model and the checkpoint at load time.
CONFIG_CHECK_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "qkv_num_param_tokens",
                       "proj_num_param_tokens", "ffn_num_param_tokens", "qkv_tau", "proj_tau", "ffn_tau",
                       "pattention_normalization", "norm_epsilon_pattention", "rotary_percent", "rotary_base",
                       "block_layernorm", "layernorm_epsilon", "make_vocab_size_divisible_by", "model_type",
                       "ffn_hidden_size")


def _log(msg: str) -> None:
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(msg, flush=True)


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def _barrier() -> None:
    from megatron_tokenformer.tensor_parallel.mappings import barrier
    barrier()


def _agree(ok: bool) -> bool:
    """True on all ranks iff ``ok`` on all ranks."""
    if not torch.distributed.is_initialized():
        return ok
    from megatron_tokenformer.tensor_parallel.mappings import all_reduce_over
    flag = torch.tensor([0.0 if ok else 1.0], device=parallel_state.get_communication_device())
    return all_reduce_over(flag, "world", op="max").item() == 0.0


# --------------------------------------------------------------------------- layout helpers
def current_layout(engine=None) -> Dict[str, Any]:
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    # the ranks holding the same parameters: DP x CP (context-parallel ranks are data-parallel replicas to
    # DeepSpeed, which writes one ZeRO shard per rank of that group), so the files read like a CP = 1 checkpoint
    dp = parallel_state.get_data_parallel_world_size(with_context_parallel=True)
    layout = {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp, "data_parallel_size": dp,
              "world_size": _world()}
    if parallel_state.get_context_parallel_world_size() > 1:
        layout["context_parallel_size"] = parallel_state.get_context_parallel_world_size()
    if engine is not None:
        layout["zero_stage"] = int(engine.zero_optimization_stage())
        layout["precision"] = "bf16" if engine.bfloat16_enabled() else ("fp16" if engine.fp16_enabled() else "fp32")
    return layout


def expand_command(load_dir: str, iteration: int, target: Tuple[int, int, int], save_dir: Optional[str] = None) -> str:
    """The tools/expand_checkpoint.py command that converts a checkpoint for layout ``target``."""
    tp, pp, dp = target
    save_dir = save_dir or f"{load_dir.rstrip(os.sep)}_tp{tp}_pp{pp}_dp{dp}"
    return (f"python tools/expand_checkpoint.py --load {load_dir} --iteration {iteration} --save {save_dir} "
            f"--target-tensor-model-parallel-size {tp} --target-pipeline-model-parallel-size {pp} "
            f"--target-data-parallel-size {dp}")


def parameter_map(module: torch.nn.Module) -> List[Dict[str, Any]]:
    """This rank's parameters: local name, canonical name, local shape, dtype, TP partitioning, vocab flag."""
    names = canonical_parameter_names(module)
    vocab = vocab_parameters(module)
    out = []
    for name, p in module.named_parameters():
        pdim = int(getattr(p, "partition_dim", 0)) if getattr(p, "tensor_model_parallel", False) else None
        out.append({"name": name, "canonical": names[name], "shape": list(p.shape),
                    "dtype": str(p.dtype).replace("torch.", ""), "partition_dim": pdim, "vocab": id(p) in vocab})
    return out


# --------------------------------------------------------------------------- RNG
def _rng_state() -> Dict[str, Any]:
    from megatron_tokenformer.tensor_parallel.random import get_rng_tracker
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": get_rng_tracker().get_states()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    from megatron_tokenformer.tensor_parallel.random import get_rng_tracker
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_rng_tracker().set_states(state["tracker"])


# --------------------------------------------------------------------------- save
def _args_dict(options: CheckpointOptions) -> Dict[str, Any]:
    return metadata.jsonable({k: v for k, v in options.run_args.items() if not k.startswith("_")})


def save_checkpoint(engine, options: CheckpointOptions, config, iteration: int, consumed_samples: int,
                    tokenizer_model: Optional[str] = None, run_id: Optional[str] = None) -> str:
    """Save step ``iteration`` into ``options.save`` (all ranks call this). Returns the step folder.

    ``run_id``: this run's id (:func:`~.save_dir.prepare_save_dir`), recorded in the step's metadata;
    ``--keep-last-n-checkpoints`` then prunes older steps of that id. Crash safety: see
    :mod:`.format.files`.
    """
    save_dir = os.path.abspath(options.save)
    tag = files.step_tag(iteration)
    partial_tag = tag + files.PARTIAL_SUFFIX
    partial_dir = os.path.join(save_dir, partial_tag)
    final_dir = os.path.join(save_dir, tag)
    rank = _rank()
    start = time.time()
    prepare_error = None
    if rank == 0:
        try:
            os.makedirs(save_dir, exist_ok=True)
            files.remove_stale_partials(save_dir)
        except OSError as exc:
            prepare_error = exc
    save_dir_lib.agree_on_save(prepare_error, partial_dir, iteration)  # [save_dir]

    module = engine.module
    client = {
        "params": parameter_map(module),
        "pipeline_rank": parallel_state.get_pipeline_model_parallel_rank(),
        "tensor_rank": parallel_state.get_tensor_model_parallel_rank(),
        "data_parallel_rank": parallel_state.get_data_parallel_rank(with_context_parallel=True),
        "iteration": int(iteration),
        "consumed_samples": int(consumed_samples),
    }
    # DeepSpeed's pipeline checkpoints skip tied layers that have a forward_fn (the embedding):
    # keep their (low-precision) weights here so a native load can restore them.
    tied = {n: p.detach().cpu().clone() for n, p in module.named_parameters() if n.startswith("tied_modules.")}
    if tied:
        client["tied_weights"] = tied
    if not engine.zero_optimization():
        names = {id(p): n for n, p in module.named_parameters()}
        base = deepspeed_boundary.base_optimizer(engine.optimizer)
        client["optimizer_groups"] = [[names[id(p)] for p in g["params"] if id(p) in names]
                                      for g in getattr(base, "param_groups", [])]
    write_error = None  # [save_dir] a failed write ends the run with one line on every rank
    recorder = checksums.ChecksumRecorder(partial_dir)  # [checksums] every file this rank writes
    try:
        # a failed write does not raise out of DeepSpeed's save (whose collectives every rank must reach)
        with deepspeed_boundary.guarded_checkpoint_writes(engine, checksums.HashingWriter,
                                                          recorder.record_writer) as writes:
            engine.save_checkpoint(save_dir, tag=partial_tag, client_state={CLIENT_STATE_KEY: client},
                                   save_latest=False)
        if writes.error is not None:
            raise writes.error
        # every rank's RNG states (DeepSpeed keeps only data-parallel rank 0's model file)
        rng_path = os.path.join(partial_dir, files.rng_file_name(rank))
        with durable_write(rng_path) as f:
            writer = checksums.HashingWriter(f)
            torch.save(_rng_state(), writer)
        recorder.record_writer(rng_path, writer)
        if rank == 0:
            has_tok = False
            if tokenizer_model and os.path.isfile(tokenizer_model):
                shutil.copyfile(tokenizer_model, os.path.join(partial_dir, files.TOKENIZER_FILE))
                recorder.record_file(os.path.join(partial_dir, files.TOKENIZER_FILE))
                has_tok = True
            meta = build_meta(metadata.KIND_DEEPSPEED, config, _args_dict(options), current_layout(engine), iteration,
                              consumed_samples, tokenizer_model, has_tok)
            meta["run_id"] = run_id  # [save_dir] which run wrote the step
            # where it keeps Adam's step
            meta["optimizer"] = describe_optimizer(deepspeed_boundary.base_optimizer(engine.optimizer))
            meta["checksums"] = checksums.metadata_entry(_world())
            metadata.write_json(os.path.join(partial_dir, files.META_FILE), meta)
            recorder.record_file(os.path.join(partial_dir, files.META_FILE))
        recorder.write_manifest(rank)
    except (OSError, RuntimeError) as exc:
        write_error = exc
    save_dir_lib.agree_on_save(write_error, partial_dir, iteration)  # [save_dir]
    publish_error = None
    if rank == 0:
        try:
            files.publish_step_dir(partial_dir, final_dir)
            files.update_latest(save_dir, tag)
            deleted = save_dir_lib.prune_own_checkpoints(save_dir, options.keep_last_n_checkpoints,
                                                         run_id)
            msg = f"saved checkpoint {final_dir} (iteration {iteration}) in {time.time() - start:.2f} s"
            if deleted:
                msg += f"; removed {', '.join(deleted)} (--keep-last-n-checkpoints)"
            _log(msg)
        except OSError as exc:
            publish_error = exc
    save_dir_lib.agree_on_save(publish_error, partial_dir, iteration)  # [save_dir]
    return final_dir


# --------------------------------------------------------------------------- load-time checks
def check_config_matches(config, ckpt_config: Dict[str, Any], step_dir: str) -> None:
    """Refuse a checkpoint whose model config differs from ``config`` (fields listed)."""
    diffs = []
    mine = config.to_dict()
    for field in CONFIG_CHECK_FIELDS:
        if field not in ckpt_config:
            continue
        a, b = mine.get(field), ckpt_config[field]
        if isinstance(a, float) or isinstance(b, float):
            same = a is not None and b is not None and abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(b)))
        else:
            same = a == b
        if not same:
            diffs.append(f"{field}: model {a!r} vs checkpoint {b!r}")
    if diffs:
        raise CheckpointMismatchError(f"the checkpoint {step_dir} does not match the model being built; "
                                      "differing fields: " + "; ".join(diffs))


# --------------------------------------------------------------------------- load
def load_checkpoint(engine, options: CheckpointOptions, config) -> Tuple[int, int]:
    """Load ``options.load`` (all ranks call this). Returns (iteration, consumed_samples); (0, 0) if none.

    The caller runs :func:`~.file_checks.verify_step_files` on the step first (pretrain_tokenformer.py
    does): DeepSpeed's loader below unpickles its files with ``torch.load``, so they must have passed the
    allowlist and their checksums before this is called."""
    load = options.load
    if not load:
        return 0, 0
    step_dir = files.resolve_step_dir(load)
    if step_dir is None:
        _log(f"no checkpoint found in {load}, starting from scratch")
        return 0, 0
    start = time.time()
    meta = metadata.read_meta(step_dir)
    check_config_matches(config, meta.get("model_config", {}), step_dir)
    finetune = options.finetune
    load_optim = not finetune and not options.no_load_optim
    load_rng = not finetune and not options.no_load_rng
    here = current_layout(engine)
    saved = meta.get("layout", {})
    same_layout = (meta.get("kind") == metadata.KIND_DEEPSPEED and _layout_tuple(saved) == _layout_tuple(here)
                   and saved.get("zero_stage") == here["zero_stage"] and saved.get("precision") == here["precision"])
    tag = os.path.basename(step_dir)
    iteration = int(meta.get("iteration", 0))
    if same_layout:
        # apex FusedAdam <-> torch AdamW: the step converted to where this optimizer reads it
        with adam_step_conversion(deepspeed_boundary.base_optimizer(engine.optimizer), saved_step_layout(meta)):
            load_path, client_state = engine.load_checkpoint(load, tag=tag, load_module_strict=True,
                                                             load_optimizer_states=load_optim,
                                                             load_lr_scheduler_states=not finetune,
                                                             load_module_only=finetune)
        if load_path is None:
            raise CheckpointFormatError(f"DeepSpeed could not load {step_dir}")
        _restore_tied_weights(engine, (client_state or {}).get(CLIENT_STATE_KEY, {}), load_optim, step_dir)
        how = "DeepSpeed files at the same layout"
    else:
        what = (f"a {meta.get('kind')} checkpoint" if meta.get("kind") != metadata.KIND_DEEPSPEED else
                f"a checkpoint written at (tp, pp, dp) = {_layout_tuple(saved)}, ZeRO {saved.get('zero_stage')}, "
                f"{saved.get('precision')}")
        _log(f"loading {what} into (tp, pp, dp) = {_layout_tuple(here)}, ZeRO {here['zero_stage']}, "
             f"{here['precision']} through the resharding path"
             + ("" if meta.get("kind") != metadata.KIND_DEEPSPEED else
                "; to convert it once instead: " + expand_command(load, iteration, _layout_tuple(here))))
        ok, error = True, None
        try:
            view = CheckpointView(step_dir, verify=False)  # verified by file_checks.verify_step_files
        except (CheckpointFormatError, OSError, KeyError, ValueError) as exc:
            ok, error, view = False, exc, None
        if not _agree(ok):
            raise CheckpointFormatError(f"cannot read {step_dir} for resharding: {error or 'failed on another rank'}")
        try:
            load_view_into_engine(engine, view, config, load_optim=load_optim, load_scheduler=not finetune)
        finally:
            view.close()
        how = "resharding path"
    if engine.lr_scheduler is not None:
        # The schedule sets the LR of the next update on both paths: DeepSpeed's ZeRO load restores the
        # optimizer's param groups (their saved "lr") after the scheduler's state.
        engine.lr_scheduler.apply()
    if finetune:
        iteration, consumed = 0, 0
    else:
        consumed = int(meta.get("consumed_samples", 0))
    if load_rng:
        rng_path = os.path.join(step_dir, files.rng_file_name(_rank()))
        if same_layout and os.path.isfile(rng_path):
            _set_rng_state(materialize(TorchFile(rng_path).obj))  # [safe_pickle] the allowlist, not torch.load
        else:
            _log("RNG states not restored (the checkpoint was written at another layout); "
                 "the run continues with freshly seeded generators")
    _barrier()
    _log(f"loaded checkpoint {step_dir} (iteration {meta.get('iteration')}, consumed samples "
         f"{meta.get('consumed_samples')}) via {how} in {time.time() - start:.2f} s"
         + (" [--finetune: weights only, iteration 0]" if finetune else "")
         + (" [--no-load-optim]" if not load_optim and not finetune else ""))
    return iteration, consumed


def _restore_tied_weights(engine, client: Dict[str, Any], load_optim: bool, step_dir: str) -> None:
    """Put back the pipeline's tied weights (DeepSpeed's layer files do not hold them)."""
    tied = client.get("tied_weights") or {}
    params = dict(engine.module.named_parameters())
    wanted = [n for n in params if n.startswith("tied_modules.")]
    missing = [n for n in wanted if n not in tied]
    if missing:
        raise CheckpointFormatError(f"{step_dir}: the pipeline's tied weights {missing} are not in the checkpoint")
    with torch.no_grad():
        for name in wanted:
            params[name].data.copy_(tied[name].to(params[name].dtype))
    if wanted and engine.zero_optimization() and not load_optim and hasattr(engine.optimizer, "refresh_fp32_params"):
        engine.optimizer.refresh_fp32_params()  # the fp32 masters were taken from the (stale) weights


def load_view_into_engine(engine, view: CheckpointView, config, load_optim: bool = True,
                          load_scheduler: bool = True) -> None:
    """Place every parameter (and, with ``load_optim``, its fp32 master and optimizer state) from a
    :class:`CheckpointView` into this rank's engine, at whatever layout the engine runs.

    Works for ZeRO-1/2 (fp32/bf16/fp16: each parameter's fragment of the flat partitions,
    :func:`~megatron_tokenformer.deepspeed_boundary.zero_fragment`) and for ZeRO-0 in fp32 (the
    optimizer holds the parameters themselves).
    """
    module = engine.module
    zero = bool(engine.zero_optimization())
    base = deepspeed_boundary.base_optimizer(engine.optimizer)
    if not zero and engine.optimizer is not base and load_optim:
        raise CheckpointFormatError("the resharding path supports ZeRO stage 1/2, or stage 0 in fp32; this run "
                                    f"uses stage 0 with {type(engine.optimizer).__name__}")
    state_keys = list(view.state_keys) if load_optim else []
    # group index -> step; checked to be the same for all parameters of a group
    group_steps: Dict[int, float] = {}

    def note_step(group: int, entry, name):
        if entry.step is None:
            return
        prev = group_steps.setdefault(group, entry.step)
        if prev != entry.step:
            raise CheckpointFormatError(f"{view.step_dir}: {name} has optimizer step {entry.step} but its group "
                                        f"has {prev}; cannot place it in one ZeRO group")

    if zero and state_keys:
        for gi, group in enumerate(base.param_groups):
            flat = group["params"][0]
            st = base.state[flat]
            for key in state_keys:
                if key not in st:
                    st[key] = torch.zeros_like(flat)
    param_group_of = {}
    if not zero:
        for gi, group in enumerate(base.param_groups):
            for p in group["params"]:
                param_group_of[id(p)] = gi

    with torch.no_grad():
        for local_name, param, cname, entry, read in _param_slices(module, view, config):
            value = read(FP32)
            param.data.copy_(value.to(param.dtype))
            flat_value = value.view(-1)
            fragment = deepspeed_boundary.zero_fragment(param) if zero else None
            if fragment is not None:
                lo, n = fragment.start, fragment.numel
                fragment.master.copy_(flat_value[lo:lo + n])
                if state_keys:
                    note_step(fragment.group_index, entry, cname)
                    for key in state_keys:
                        fragment.optimizer_state(base, key).copy_(read(key).view(-1)[lo:lo + n])
            elif not zero and state_keys:
                gi = param_group_of.get(id(param))
                if gi is None:
                    continue
                note_step(gi, entry, cname)
                st = base.state[param]
                for key in state_keys:
                    st[key] = read(key).to(param.dtype).view_as(param).clone()
                if entry.step is not None:
                    set_adam_step(base, gi, st, entry.step)

    if state_keys:
        if zero:
            for gi, group in enumerate(base.param_groups):
                step = group_steps.get(gi)
                st = base.state[group["params"][0]]
                if step is not None:
                    set_adam_step(base, gi, st, step)
                elif "step" not in st and "step" not in group:
                    set_adam_step(base, gi, st, 0)
            deepspeed_boundary.optimizer_state_replaced(engine.optimizer)
    if load_optim:  # (also when every step so far was skipped for overflow and Adam has no state yet)
        deepspeed_boundary.restore_loss_scaler(engine.optimizer, view.training_state.get("loss_scaler"))
    ts = view.training_state
    if load_scheduler:
        engine.global_steps = int(ts.get("global_steps", 0))
        engine.global_samples = int(ts.get("global_samples", 0))
        engine.skipped_steps = int(ts.get("skipped_steps", 0))
        if engine.lr_scheduler is not None and ts.get("lr_scheduler"):
            engine.lr_scheduler.load_state_dict(ts["lr_scheduler"])
