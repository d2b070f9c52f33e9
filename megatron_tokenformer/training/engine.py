"""Model, optimizer and DeepSpeed engine construction.

* PP = 1: the plain :class:`~megatron_tokenformer.model.GPTModel` in a ``DeepSpeedEngine``, with
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
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional

import torch

from megatron_tokenformer import parallel_state

__all__ = ["OptimizerOptions", "DeepSpeedOptions", "EngineOptions", "get_device", "build_model", "get_param_groups",
           "build_optimizer", "build_deepspeed_config", "setup_model_and_optimizer", "apex_available"]


def get_device(device_index: Optional[int]) -> torch.device:
    """``cuda:device_index`` (made the current device), or the CPU when ``device_index`` is None.

    The index comes from :func:`megatron_tokenformer.launch.bind_cuda_device`, which also makes
    ``LOCAL_RANK`` say the same index, so DeepSpeed binds the same device.
    """
    if device_index is None:
        return torch.device("cpu")
    torch.cuda.set_device(device_index)
    return torch.device("cuda", device_index)


def apex_available(cuda_available: Optional[bool] = None) -> bool:
    """apex's FusedAdam is used only with CUDA and when its CUDA extension loads.

    A Python-only apex install (``pip install apex`` without ``--cuda_ext``) imports, but
    ``FusedAdam()`` then raises: its kernels live in the ``amp_C`` extension, reached through
    ``multi_tensor_applier``. Both are probed here, not just ``import apex``.
    """
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if not cuda_available:
        return False
    try:
        import amp_C
        from apex.multi_tensor_apply import multi_tensor_applier
        from apex.optimizers import FusedAdam  # noqa: F401
        return bool(getattr(multi_tensor_applier, "available", False)) and hasattr(amp_C, "multi_tensor_adam")
    except Exception:
        return False


# --------------------------------------------------------------------------- options (from the flags)
@dataclass(frozen=True)
class OptimizerOptions:
    """AdamW and its learning-rate schedule (``--lr``, ``--weight-decay``, ``--adam-*``, ``--lr-*``)."""

    lr: float
    min_lr: float = 0.0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    lr_warmup_iters: int = 0
    lr_decay_iters: Optional[int] = None
    lr_decay_style: str = "linear"
    override_opt_param_scheduler: bool = False
    use_checkpoint_opt_param_scheduler: bool = False


@dataclass(frozen=True)
class DeepSpeedOptions:
    """What the generated DeepSpeed config holds: batch sizes, clipping, ZeRO stage, precision and loss scaling,
    sequence parallelism, and the user's ``--deepspeed_config`` JSON (``deepspeed_json``, already reconciled
    with the flags by :func:`arguments.validate_args`)."""

    global_batch_size: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    clip_grad: float = 1.0
    zero_stage: int = 1
    fp16: bool = False
    bf16: bool = False
    loss_scale: Optional[float] = None
    initial_loss_scale: float = 2.0 ** 32
    loss_scale_window: int = 1000
    hysteresis: int = 2
    min_loss_scale: float = 1.0
    sequence_parallel: bool = False
    context_parallel_size: int = 1
    deepspeed_json: Optional[Mapping[str, Any]] = None


@dataclass(frozen=True)
class EngineOptions:
    """Everything :func:`setup_model_and_optimizer` needs besides the model config: the init ``seed``, the
    optimizer, the DeepSpeed config, and the old parameter-token rows kept frozen (``frozen_param_tokens``:
    :func:`~megatron_tokenformer.training.param_token_freezing.resolve_frozen_counts`; None: train all)."""

    seed: int
    optimizer: OptimizerOptions
    deepspeed: DeepSpeedOptions
    frozen_param_tokens: Optional[Dict[str, int]] = None


# --------------------------------------------------------------------------- model
def build_model(seed: int, config) -> torch.nn.Module:
    """GPTModel (PP = 1) or a PipelineModule (PP > 1) for ``config``, initialised from ``seed``."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        from megatron_tokenformer.model.language_model import GPTModel
        return GPTModel(config, seed=seed)

    import functools

    from deepspeed.pipe import PipelineModule
    from torch.utils.checkpoint import checkpoint

    from megatron_tokenformer.model.language_model import get_block_class
    from megatron_tokenformer.model.pipeline import get_layer_specs, pipeline_loss_fn
    from megatron_tokenformer.model.recompute import apply_block_recompute_to_pipeline
    # --recompute-granularity full (--checkpoint-activations): uniform = chunks of --recompute-num-layers
    # layers of the stage recomputed in the backward pass (torch's non-reentrant checkpoint); block = the
    # first --recompute-num-layers blocks of the stage. Selective is the attention module's job.
    full = getattr(config, "recompute_granularity", None) == "full"
    uniform = full and config.recompute_method == "uniform"
    module = PipelineModule(layers=get_layer_specs(config, seed), loss_fn=pipeline_loss_fn,
                            topology=parallel_state.get_topology(), partition_method="parameters",
                            activation_checkpoint_interval=config.recompute_num_layers if uniform else 0,
                            activation_checkpoint_func=functools.partial(checkpoint, use_reentrant=False))
    if full and config.recompute_method == "block":
        apply_block_recompute_to_pipeline(module, (get_block_class(config),), config.recompute_num_layers)
    return module


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


def build_optimizer(options: OptimizerOptions, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW: apex FusedAdam on CUDA when importable, torch's AdamW otherwise (CPU included)."""
    groups = get_param_groups(model, options.weight_decay)
    kwargs = dict(lr=options.lr, betas=(options.adam_beta1, options.adam_beta2), eps=options.adam_eps,
                  weight_decay=options.weight_decay)
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


def build_deepspeed_config(options: DeepSpeedOptions) -> dict:
    """The DeepSpeed config: the user's ``--deepspeed_config`` JSON (already reconciled with the flags
    by :func:`arguments.validate_args`) completed from the flags."""
    user = options.deepspeed_json or {}
    derived = {
        # DeepSpeed's data-parallel group is DP x CP (parallel_state.deepspeed_mpu / get_topology): it counts
        # each context-parallel rank's part of a sample as a sample of its own
        "train_batch_size": options.global_batch_size * options.context_parallel_size,
        "train_micro_batch_size_per_gpu": options.micro_batch_size,
        "gradient_accumulation_steps": options.gradient_accumulation_steps,
        "gradient_clipping": float(options.clip_grad),
        "zero_optimization": {"stage": int(options.zero_stage)},
        # our optimizer object (torch AdamW / apex FusedAdam) is fine with ZeRO-1/2
        "zero_allow_untested_optimizer": True,
        "fp16": {"enabled": bool(options.fp16)},
        "bf16": {"enabled": bool(options.bf16)},
    }
    if options.fp16:
        derived["fp16"].update({
            "loss_scale": float(options.loss_scale) if options.loss_scale else 0,  # 0 = dynamic
            "initial_scale_power": int(round(math.log2(options.initial_loss_scale))),
            "loss_scale_window": int(options.loss_scale_window),
            "hysteresis": int(options.hysteresis),
            "min_loss_scale": float(options.min_loss_scale),
        })
    cfg = _merge(user, derived)
    if options.bf16:
        apply_bf16_gradient_precision(cfg)
    if options.sequence_parallel:
        # DeepSpeed's pipeline sends 1/TP of each activation (and gradient) per TP rank and all-gathers on
        # receipt, assuming they are replicated over the TP group; with sequence parallelism every TP rank
        # holds a different sequence chunk [b, s/p, d], so each rank sends its own whole tensor.
        cfg["pipeline"] = dict(cfg.get("pipeline") or {}, pipe_partitioned=False, grad_partitioned=False)
    # We print our own log lines; keep DeepSpeed's periodic prints out of the way unless asked for.
    cfg.setdefault("steps_per_print", 10 ** 9)
    cfg.setdefault("wall_clock_breakdown", False)
    disable_throughput_timer(cfg)
    return cfg


def disable_throughput_timer(cfg: dict) -> dict:
    """Turn DeepSpeed's throughput timer off unless the user's JSON sets ``timers.throughput.enabled``.

    DeepSpeed 0.19 enables it by default with ``synchronized: true``: at PP = 1 the engine starts and
    stops it around every micro-batch's forward and step, and each start/stop synchronises the device
    (two host-device syncs per micro-batch, stalling the CPU's run-ahead on GPUs). It only feeds
    DeepSpeed's own ``steps_per_print`` lines; the training loop measures tokens/s itself.
    """
    throughput = cfg.setdefault("timers", {}).setdefault("throughput", {})
    throughput.setdefault("enabled", False)
    return cfg


def apply_bf16_gradient_precision(cfg: dict) -> dict:
    """bf16 training accumulates and reduces gradients in fp32 (what the user's JSON sets wins).

    Without ``data_types`` DeepSpeed 0.19 keeps bf16 gradients: the sum over the micro-batches of a
    step (32 in the 354M recipe) and the data-parallel reduction both round to 8 mantissa bits.
    ``grad_accum_dtype: fp32`` makes ZeRO-1 (any pipeline size) use DeepSpeed's ``BF16_Optimizer``,
    which accumulates into fp32 gradient partitions; ``communication_data_type: fp32`` makes the
    reduction run in fp32. (ZeRO-2 with bf16 params ignores ``grad_accum_dtype`` in DeepSpeed 0.19:
    there the accumulation stays bf16 and only the reduction is fp32.)
    """
    cfg.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    cfg.setdefault("communication_data_type", "fp32")
    return cfg


# --------------------------------------------------------------------------- engine


def setup_model_and_optimizer(options: EngineOptions, config, device: Optional[torch.device] = None):
    """Build model, optimizer, LR schedule and the DeepSpeed engine.

    Returns ``(engine, optimizer, lr_scheduler)``; ``engine`` is a ``PipelineEngine`` when PP > 1.
    """
    import deepspeed

    from megatron_tokenformer import deepspeed_boundary
    deepspeed_boundary.defer_deepspeed_muon_modules()  # DeepSpeed's Muon modules compile kernels on import

    from megatron_tokenformer.training.lr_schedules import OptimizerParamScheduler

    model = build_model(options.seed, config)
    if device is not None and device.type == "cuda":
        model.to(device)  # before the optimizer: fused optimizers check the parameters' device
    from megatron_tokenformer.training.param_token_freezing import setup_param_token_freezing
    # --train-only-new-param-tokens: before the optimizer
    freezer = setup_param_token_freezing(options.frozen_param_tokens, model)
    opt = options.optimizer
    optimizer = build_optimizer(opt, model)
    scheduler = OptimizerParamScheduler(optimizer, max_lr=opt.lr, min_lr=opt.min_lr,
                                        warmup_steps=opt.lr_warmup_iters, decay_steps=opt.lr_decay_iters,
                                        decay_style=opt.lr_decay_style,
                                        override_opt_param_scheduler=opt.override_opt_param_scheduler,
                                        use_checkpoint_opt_param_scheduler=opt.use_checkpoint_opt_param_scheduler)
    ds_config = build_deepspeed_config(options.deepspeed)
    if options.deepspeed.fp16:
        deepspeed_boundary.allow_fp16_on_cpu()
    pipelined = parallel_state.get_pipeline_model_parallel_world_size() > 1
    engine, ds_optimizer, _, lr_scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
        mpu=None if pipelined else parallel_state.deepspeed_mpu())
    engine.param_token_freezer = freezer
    return engine, ds_optimizer, lr_scheduler


def is_pipeline_engine(engine) -> bool:
    import deepspeed
    return isinstance(engine, deepspeed.PipelineEngine)

