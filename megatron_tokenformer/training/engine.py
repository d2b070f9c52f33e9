"""Model, optimizer and DeepSpeed engine construction.

* PP = 1: the plain :class:`~megatron_tokenformer.model.TokenformerLM` in a ``DeepSpeedEngine``, with
  ``mpu=parallel_state`` so that gradient all-reduces run over the data-parallel group and the
  gradient norm is summed over the tensor-parallel group.
* PP > 1: a ``deepspeed.pipe.PipelineModule`` built from the model's layer specs (the tied embedding
  is a ``TiedLayerSpec``), layers partitioned by parameter count, on the topology of
  :func:`parallel_state.get_topology` -- the same (pipe, data, model) rank layout as the project's
  groups -- trained with DeepSpeed's 1F1B schedule (``PipelineEngine``). DeepSpeed derives its
  model-parallel unit from the topology (``deepspeed.initialize`` refuses an explicit ``mpu`` with a
  PipelineModule).

Gradient norm and clipping: DeepSpeed 0.19 counts a parameter's gradient in the global norm on
every tensor-parallel rank when ``is_model_parallel_parameter(p)`` (our partitioned parameters
carry ``tensor_model_parallel = True``) and on tensor-parallel rank 0 only otherwise (replicated
parameters such as the final LayerNorm), then sums over the tensor x pipeline group; the second
pipeline copy of the tied embedding is marked ``ds_pipe_replicated`` and skipped. ZeRO-1/2 and the
bf16/fp16 optimizers all use that rule with the *tensor*-parallel rank (``bwc_tensor_model_parallel_rank``).
"""

from __future__ import annotations

import copy
import math
from typing import Dict, List, Optional, Tuple

import torch

from megatron_tokenformer import parallel_state

__all__ = ["get_device", "build_model", "get_param_groups", "build_optimizer", "build_deepspeed_config",
           "setup_model_and_optimizer", "apex_available"]


def get_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def apex_available() -> bool:
    """apex's fused Adam is used only when importable *and* CUDA is present."""
    if not torch.cuda.is_available():
        return False
    try:
        from apex.optimizers import FusedAdam  # noqa: F401
    except Exception:
        return False
    return True


def skip_cpu_shm_comm_build() -> None:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory all-reduce op at ``init_distributed``.

    On CPU, DeepSpeed 0.19's torch backend builds ``deepspeed_shm_comm`` (a C++ extension, 30-90 s
    of compiling on a small machine, redone whenever a different ``ninja`` runs the build) although
    only ``inference_all_reduce`` uses it; training never does. Marking it incompatible makes the
    backend skip it (``build_shm_op`` returns None). Call before ``deepspeed.init_distributed``.
    """
    try:
        import deepspeed.ops
        compatible = deepspeed.ops.__compatible_ops__
        if isinstance(compatible, dict):
            compatible["deepspeed_shm_comm"] = False
    except Exception:  # pragma: no cover - another DeepSpeed layout: building the op is harmless
        pass


# --------------------------------------------------------------------------- model


def build_model(args, config, seed: Optional[int] = None) -> torch.nn.Module:
    """TokenformerLM (PP = 1) or a PipelineModule (PP > 1) for ``config``."""
    seed = args.seed if seed is None else seed
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        from megatron_tokenformer.model.language_model import TokenformerLM
        return TokenformerLM(config, seed=seed)

    import functools

    from deepspeed.pipe import PipelineModule
    from torch.utils.checkpoint import checkpoint

    from megatron_tokenformer.model.pipeline import get_layer_specs, pipeline_loss_fn
    # With --checkpoint-activations every layer's activations are recomputed in the backward pass,
    # with torch's non-reentrant checkpoint, as TokenformerLM does at PP = 1.
    return PipelineModule(layers=get_layer_specs(config, seed), loss_fn=pipeline_loss_fn,
                          topology=parallel_state.get_topology(), partition_method="parameters",
                          activation_checkpoint_interval=1 if args.checkpoint_activations else 0,
                          activation_checkpoint_func=functools.partial(checkpoint, use_reentrant=False))


# --------------------------------------------------------------------------- optimizer


def get_param_groups(model: torch.nn.Module, weight_decay: float) -> List[Dict]:
    """Weight-decayed parameters (parameter tokens, embedding) and the rest (LayerNorm weights, biases).

    Always exactly two non-empty groups on every rank. DeepSpeed drops empty groups, and its ZeRO
    optimizer all-reduces one gradient norm per group over the tensor x pipeline group, so ranks
    with different group counts issue different numbers of collectives and hang. With
    non-parametric block LayerNorms the first pipeline stage has no LayerNorm parameter at all; there
    the decayed parameters are split over two groups (both decayed), which keeps every parameter's
    update unchanged and the group count equal.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    if decay and no_decay:
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if len(decay) >= 2:
        return [{"params": decay[:-1], "weight_decay": weight_decay},
                {"params": decay[-1:], "weight_decay": weight_decay}]
    if len(no_decay) >= 2:
        return [{"params": no_decay[:-1], "weight_decay": 0.0}, {"params": no_decay[-1:], "weight_decay": 0.0}]
    raise ValueError(f"this rank holds {len(decay) + len(no_decay)} trainable parameter(s); every pipeline stage "
                     f"needs at least two (use fewer pipeline stages)")


def build_optimizer(args, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW: apex FusedAdam on CUDA when importable, torch's AdamW otherwise (CPU included)."""
    groups = get_param_groups(model, args.weight_decay)
    kwargs = dict(lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps,
                  weight_decay=args.weight_decay)
    if apex_available():
        from apex.optimizers import FusedAdam
        return FusedAdam(groups, adam_w_mode=True, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


# --------------------------------------------------------------------------- DeepSpeed config


def _merge(base: dict, updates: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def build_deepspeed_config(args) -> dict:
    """The DeepSpeed config: the user's ``--deepspeed_config`` JSON (already reconciled with the flags
    by :func:`arguments.validate_args`) completed from the flags."""
    user = getattr(args, "deepspeed_json", None) or {}
    derived = {
        "train_batch_size": args.global_batch_size,
        "train_micro_batch_size_per_gpu": args.micro_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "gradient_clipping": float(args.clip_grad),
        "zero_optimization": {"stage": int(args.zero_stage)},
        # our optimizer object (torch AdamW / apex FusedAdam) is fine with ZeRO-1/2
        "zero_allow_untested_optimizer": True,
        "fp16": {"enabled": bool(args.fp16)},
        "bf16": {"enabled": bool(args.bf16)},
    }
    if args.fp16:
        derived["fp16"].update({
            "loss_scale": float(args.loss_scale) if args.loss_scale else 0,  # 0 = dynamic
            "initial_scale_power": int(round(math.log2(args.initial_loss_scale))),
            "loss_scale_window": int(args.loss_scale_window),
            "hysteresis": int(args.hysteresis),
            "min_loss_scale": float(args.min_loss_scale),
        })
    cfg = _merge(user, derived)
    # We print our own log lines; keep DeepSpeed's periodic prints out of the way unless asked for.
    cfg.setdefault("steps_per_print", 10 ** 9)
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg


# --------------------------------------------------------------------------- engine


def _allow_fp16_on_cpu() -> None:
    """Let DeepSpeed's CPU accelerator run fp16 on any CPU.

    DeepSpeed 0.19's CPU accelerator reports fp16 as supported only when oneDNN has native fp16
    kernels (AVX512-FP16 / AMX-FP16) and then refuses ``"fp16": {"enabled": true}``. torch runs fp16
    on every CPU (emulated, slowly), which is what a CPU test of the fp16 code path (dynamic loss
    scaling, overflow skipping) needs. On GPUs nothing changes.
    """
    from deepspeed.accelerator import get_accelerator
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu" and not accelerator.is_fp16_supported():
        accelerator.is_fp16_supported = lambda: True
        supported = accelerator.supported_dtypes
        accelerator.supported_dtypes = lambda: list(dict.fromkeys(supported() + [torch.float16]))


def setup_model_and_optimizer(args, config, device: Optional[torch.device] = None):
    """Build model, optimizer, LR schedule and the DeepSpeed engine.

    Returns ``(engine, optimizer, lr_scheduler)``; ``engine`` is a ``PipelineEngine`` when PP > 1.
    """
    import deepspeed

    from megatron_tokenformer.training.lr_schedules import OptimizerParamScheduler

    model = build_model(args, config)
    if device is not None and device.type == "cuda":
        model.to(device)  # before the optimizer: fused optimizers check the parameters' device
    optimizer = build_optimizer(args, model)
    scheduler = OptimizerParamScheduler(optimizer, max_lr=args.lr, min_lr=args.min_lr,
                                        warmup_steps=args.lr_warmup_iters, decay_steps=args.lr_decay_iters,
                                        decay_style=args.lr_decay_style,
                                        override_opt_param_scheduler=args.override_opt_param_scheduler,
                                        use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler)
    ds_config = build_deepspeed_config(args)
    if args.fp16:
        _allow_fp16_on_cpu()
    pipelined = parallel_state.get_pipeline_model_parallel_world_size() > 1
    engine, ds_optimizer, _, lr_scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
        mpu=None if pipelined else parallel_state)
    return engine, ds_optimizer, lr_scheduler


def is_pipeline_engine(engine) -> bool:
    from deepspeed.runtime.pipe.engine import PipelineEngine
    return isinstance(engine, PipelineEngine)

