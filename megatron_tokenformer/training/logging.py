"""What training prints and records: Megatron-format log lines, TensorBoard scalars, parameter counts.

Only one rank prints losses and writes TensorBoard: global rank ``(PP - 1) * DP * TP``, i.e. rank 0
of the last pipeline stage (the stage that computes the loss). Start-up messages are printed by
global rank 0.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch

from megatron_tokenformer.model.naming import canonical_parameter_names
from megatron_tokenformer.model.spec import PARAM_KINDS, UnknownParameterError, get_spec

__all__ = ["print_rank_0", "print_rank_last", "is_logging_rank", "format_train_line", "format_eval_line",
           "TensorBoardLogger", "count_model_parameters", "format_parameter_summary", "PARAM_KINDS"]


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def is_logging_rank() -> bool:
    """Rank 0 of the last pipeline stage (tensor- and data-parallel rank 0)."""
    from megatron_tokenformer import parallel_state as ps
    if not torch.distributed.is_initialized():
        return True
    return (ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
            and ps.get_data_parallel_rank(with_context_parallel=True) == 0)


def print_rank_0(message: str) -> None:
    if _rank() == 0:
        print(message, flush=True)


def print_rank_last(message: str) -> None:
    if is_logging_rank():
        print(message, flush=True)


def _fmt_opt(value: Optional[float], fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a" if value is None else str(value)
    return format(value, fmt)


def format_train_line(iteration: int, train_iters: int, consumed_samples: int, elapsed_ms: float,
                      learning_rate: float, global_batch_size: int, lm_loss: float,
                      loss_scale: Optional[float], grad_norm: Optional[float], skipped_iters: int,
                      nan_iters: int, tokens_per_sec: float, tflops_per_gpu: Optional[float],
                      mfu: Optional[float]) -> str:
    """One Megatron-format line (``| key: value |`` fields), plus throughput fields at the end."""
    s = f" iteration {iteration:8d}/{train_iters:8d} |"
    s += f" consumed samples: {consumed_samples:12d} |"
    s += f" elapsed time per iteration (ms): {elapsed_ms:.1f} |"
    s += f" learning rate: {learning_rate:.6E} |"
    s += f" global batch size: {global_batch_size:5d} |"
    s += f" lm loss: {lm_loss:.6E} |"
    s += f" loss scale: {_fmt_opt(loss_scale, '.1f')} |"
    s += f" grad norm: {_fmt_opt(grad_norm, '.6f')} |"
    s += f" number of skipped iterations: {skipped_iters:3d} |"
    s += f" number of nan iterations: {nan_iters:3d} |"
    s += f" tokens/s: {tokens_per_sec:.1f} |"
    s += f" TFLOP/s per GPU: {_fmt_opt(tflops_per_gpu, '.3f')} |"
    s += f" MFU: {'n/a' if mfu is None else format(100.0 * mfu, '.2f') + '%'} |"
    return s


def format_eval_line(iteration: int, loss: float, name: str = "validation") -> str:
    ppl = math.exp(min(loss, 20.0))
    body = f" {name} loss at iteration {iteration} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E} | "
    bar = "-" * len(body)
    return f"{bar}\n{body}\n{bar}"


class TensorBoardLogger:
    """Writes scalars on the logging rank only (no-op elsewhere or without ``--tensorboard-dir``)."""

    def __init__(self, log_dir: Optional[str]):
        self.writer = None
        if log_dir and is_logging_rank():
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=log_dir, max_queue=100)

    def add_scalars(self, values: Dict[str, Optional[float]], step: int) -> None:
        if self.writer is None:
            return
        for key, value in values.items():
            if value is not None and math.isfinite(float(value)):
                self.writer.add_scalar(key, float(value), step)

    def add_text(self, tag: str, text: str) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# --------------------------------------------------------------------------- parameter counts

def _is_partitioned(p: torch.nn.Parameter) -> bool:
    return bool(getattr(p, "tensor_model_parallel", False) or getattr(p, "model_parallel", False))


def count_model_parameters(model: torch.nn.Module, config) -> Tuple[List[Dict[str, int]], Dict[str, int]]:
    """Unique parameter counts of the whole instantiated (distributed) model, per pipeline stage and per
    kind (:data:`~megatron_tokenformer.model.spec.PARAM_KINDS`, from the spec of ``config``'s family;
    a name the spec does not know counts as "other"). For the counts a config implies without a model
    see :func:`megatron_tokenformer.model.spec.config_parameter_counts`.

    Collective over the world when ``torch.distributed`` is initialised. Tensor-parallel partitions
    are summed over the TP group, replicated parameters counted once (TP rank 0), pipeline copies of
    the tied embedding counted once (on the first stage), data-parallel replicas once.
    Returns ``(per_stage, total)``: a list (one dict kind -> count per stage) and the totals.
    """
    from megatron_tokenformer import parallel_state as ps
    tp_rank = ps.get_tensor_model_parallel_rank()
    pp_size = ps.get_pipeline_model_parallel_world_size()
    pp_rank = ps.get_pipeline_model_parallel_rank()
    # on the communication device: under NCCL a CPU tensor cannot be all-reduced
    local = torch.zeros(pp_size, len(PARAM_KINDS), dtype=torch.float64, device=ps.get_communication_device())
    spec = get_spec(config)
    try:  # PipelineModule names layers by index ("3.weight"): use the layout-independent names
        canonical = canonical_parameter_names(model)
    except ValueError:
        canonical = {}

    def kind(name: str) -> str:
        try:
            return spec.classify(name).kind
        except UnknownParameterError:
            return "other"
    seen = set()
    for name, p in model.named_parameters():
        name = canonical.get(name, name)
        if id(p) in seen:
            continue
        seen.add(id(p))
        if getattr(p, "ds_pipe_replicated", False):
            continue  # the other stage's copy of a tied weight
        if not _is_partitioned(p) and tp_rank != 0:
            continue
        local[pp_rank, PARAM_KINDS.index(kind(name))] += p.numel()
    if ps.get_data_parallel_rank(with_context_parallel=True) != 0:
        local.zero_()
    if torch.distributed.is_initialized():
        from megatron_tokenformer.tensor_parallel.mappings import all_reduce_over
        local = all_reduce_over(local, "world")
    local = local.cpu()
    per_stage = [{k: int(local[s, i]) for i, k in enumerate(PARAM_KINDS)} for s in range(pp_size)]
    total = {k: int(local[:, i].sum()) for i, k in enumerate(PARAM_KINDS)}
    return per_stage, total


def format_parameter_summary(per_stage: List[Dict[str, int]], total: Dict[str, int]) -> str:
    def fmt(n: int) -> str:
        return f"{n:,}"

    lines = [f"number of parameters: {fmt(sum(total.values()))} (unique, all ranks together)"]
    for kind in PARAM_KINDS:
        if total[kind]:
            lines.append(f"  {kind:16s} {fmt(total[kind]):>16s}")
    for s, counts in enumerate(per_stage):
        lines.append(f"  pipeline stage {s}: {fmt(sum(counts.values()))}")
    return "\n".join(lines)
