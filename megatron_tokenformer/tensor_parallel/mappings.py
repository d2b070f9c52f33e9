"""Autograd-aware communication over the tensor-parallel group.

Every collective of the tensor-parallel code goes through :func:`_collective`, which optionally
records ``(kind, numel)`` into the log of an active :func:`count_collectives` context (the
communication-accounting test and docs use it). When no counter is active, recording is one
``if`` on a module-level ``None``.

Conventions (T = tokens on this rank, p = tensor-parallel size):

- ``copy_to_tensor_model_parallel_region``: forward identity, backward all-reduce.
- ``reduce_from_tensor_model_parallel_region``: forward all-reduce, backward identity.
- ``scatter_to_tensor_model_parallel_region``: forward keep own last-dim chunk, backward all-gather.
- ``gather_from_tensor_model_parallel_region``: forward all-gather (last dim), backward split; with
  ``output_grad_is_partial=True`` the backward is a reduce-scatter (the consumer's gradient is a
  partial sum, e.g. a parallel Pattention that did not copy its input).
- ``reduce_scatter_to_tensor_model_parallel_region``: forward reduce-scatter over the last dim in p
  contiguous blocks (head-major channels: block r = heads of rank r), backward all-gather.
- ``all_reduce_norm``: forward all-reduce (sum), backward all-reduce (sum). Used for the Pattention
  normalisation statistics: every rank consumes the reduced value differently, so the gradient
  arriving at each rank is a different partial and must be summed.
- ``all_reduce_max_no_grad``: max all-reduce outside autograd (softmax shift).

The same choke point carries the few collectives outside tensor parallelism (parameter counting,
checkpoint and exit agreement, data-parallel loss averaging, barriers): :func:`all_reduce_over`
and :func:`barrier` with ``group="data"`` or ``"world"``. Every collective's tensor lives on
:func:`parallel_state.get_communication_device` (the local CUDA device under NCCL, the CPU under
gloo). With ``MEGATRON_TOKENFORMER_CHECK_COLLECTIVES=1`` the training script installs
:func:`install_collective_guard`: a tensor on another device, or a ``torch.distributed``
collective called directly from a package module, raises instead of running.

Sequence parallelism (``--sequence-parallel``; activations [b, s, d], the sequence is dim 1 and rank r
holds positions [r*s/p, (r+1)*s/p)):

- ``scatter_to_sequence_parallel_region``: forward keep own sequence chunk, backward all-gather.
- ``gather_from_sequence_parallel_region``: forward all-gather along the sequence; backward
  reduce-scatter (``output_grad_is_partial=True``, the default: the consumer is a tensor-parallel layer
  whose input gradient is a per-rank partial sum; this replaces the input copy's all-reduce) or split.
- ``reduce_scatter_to_sequence_parallel_region``: forward reduce-scatter along the sequence (replaces
  the output all-reduce of a row-parallel layer), backward all-gather.

Context parallelism (``--context-parallel-size`` cp; :mod:`megatron_tokenformer.tensor_parallel.context_parallel`
holds the split of each sequence over the cp ranks of the context-parallel group):

- ``gather_from_context_parallel_region``: forward all-gather along the sequence over the context-parallel
  group (rank order: rank r's local tokens at block r), backward reduce-scatter (every rank's queries
  contributed to the gradient of every gathered key and value). The attention's K and V travel in it.
- ``all_reduce_loss_over_context_parallel``: forward sum over the context-parallel group (every rank then
  holds the loss of the whole sequence); backward the gradient times cp, because the gradient reduction
  averages over DP x CP ranks while each rank's backward carries only its own tokens' share.

Element counts recorded are the numel of the tensor handed to the collective on this rank (for
all-gather: the local input; for reduce-scatter: the full input).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_tokenformer import parallel_state

_COLLECTIVE_LOG: Optional[List[Tuple[str, int]]] = None
_COLLECTIVE_LOG_GROUP = "tensor"  # which group's collectives the active counter records


@contextlib.contextmanager
def count_collectives(group: str = "tensor"):
    """Record every collective over ``group`` (``"tensor"``, the default, or ``"context"``) issued inside
    the block.

    Yields a list that fills with ``(kind, numel)`` tuples, kind in ``all_reduce``,
    ``all_reduce_max``, ``all_gather``, ``reduce_scatter``. Collectives are recorded even when the
    group has a single rank (where they are skipped), so counts can be checked anywhere.
    Nested contexts are not supported.
    """
    global _COLLECTIVE_LOG, _COLLECTIVE_LOG_GROUP
    if _COLLECTIVE_LOG is not None:
        raise RuntimeError("count_collectives() contexts cannot be nested")
    if group not in ("tensor", "context"):
        raise ValueError(f"count_collectives: group must be 'tensor' or 'context', got {group!r}")
    log: List[Tuple[str, int]] = []
    _COLLECTIVE_LOG, _COLLECTIVE_LOG_GROUP = log, group
    try:
        yield log
    finally:
        _COLLECTIVE_LOG, _COLLECTIVE_LOG_GROUP = None, "tensor"


_KINDS = ("all_reduce", "all_reduce_max", "all_gather", "reduce_scatter")
_GROUP_NAMES = ("tensor", "context", "data", "data_context", "world")
_GUARD = False  # set by install_collective_guard()


def _resolve_group(group):
    """``None``/``"tensor"``/``"context"``/``"data"``/``"data_context"`` (DP x CP)/``"world"`` or a process
    group -> (process group, its size)."""
    if group is None or group == "tensor":
        return parallel_state.get_tensor_model_parallel_group(), parallel_state.get_tensor_model_parallel_world_size()
    if group == "context":
        return parallel_state.get_context_parallel_group(), parallel_state.get_context_parallel_world_size()
    if group == "data":
        return parallel_state.get_data_parallel_group(), parallel_state.get_data_parallel_world_size()
    if group == "data_context":
        return (parallel_state.get_data_parallel_group(with_context_parallel=True),
                parallel_state.get_data_parallel_world_size(with_context_parallel=True))
    if group == "world":
        initialised = dist.is_available() and dist.is_initialized()
        return None, (dist.get_world_size() if initialised else 1)
    if isinstance(group, str):
        raise ValueError(f"unknown group {group!r}; expected one of {_GROUP_NAMES} or a process group")
    return group, dist.get_world_size(group)


def _check_device(kind: str, tensor: torch.Tensor, group) -> None:
    expected = parallel_state.get_communication_device()
    if tensor.device != expected:
        raise RuntimeError(f"collective {kind} over the {group or 'tensor'} group got a tensor on {tensor.device}; "
                           f"the communication device is {expected}")


def _collective(kind: str, tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Run one collective; the single place communication happens in the package.

    kind: ``all_reduce`` (sum), ``all_reduce_max``,
    ``all_gather`` (concatenate along dim 0), ``reduce_scatter`` (sum, keep this rank's dim-0 block).
    group: ``None`` or ``"tensor"`` (the tensor-parallel group), ``"context"``, ``"data"``,
    ``"data_context"``, ``"world"``, or a process group. Returns a new tensor; with a single rank, the
    input itself (never modify it in place). Only tensor-parallel (or, when asked, context-parallel)
    collectives are recorded by :func:`count_collectives`.
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown collective kind {kind!r}; expected one of {_KINDS}")
    if _COLLECTIVE_LOG is not None and (group or "tensor") == _COLLECTIVE_LOG_GROUP:
        _COLLECTIVE_LOG.append((kind, tensor.numel()))
    if _GUARD:
        _check_device(kind, tensor, group)
    group, world = _resolve_group(group)
    if world == 1:  # nothing to exchange (the log above still records the call)
        return tensor
    if kind in ("all_reduce", "all_reduce_max"):
        out = tensor.clone(memory_format=torch.contiguous_format)
        op = dist.ReduceOp.SUM if kind == "all_reduce" else dist.ReduceOp.MAX
        dist.all_reduce(out, op=op, group=group)
        return out
    tensor = tensor.contiguous()
    if kind == "all_gather":
        out = torch.empty((world * tensor.shape[0],) + tuple(tensor.shape[1:]),
                          dtype=tensor.dtype, device=tensor.device)
        _all_gather_single(out, tensor, group=group)
        return out
    if kind == "reduce_scatter":
        if tensor.shape[0] % world != 0:
            raise ValueError(f"reduce_scatter: dim 0 ({tensor.shape[0]}) not divisible by {world} ranks")
        out = torch.empty((tensor.shape[0] // world,) + tuple(tensor.shape[1:]),
                          dtype=tensor.dtype, device=tensor.device)
        _reduce_scatter_single(out, tensor, op=dist.ReduceOp.SUM, group=group)
        return out


def all_reduce_over(tensor: torch.Tensor, group: str = "world", op: str = "sum") -> torch.Tensor:
    """Sum (``op="sum"``) or max (``op="max"``) of ``tensor`` over ``group`` ("world", "data",
    "data_context", "context" or "tensor"), outside autograd. The tensor must be on the communication device.
    Returns a new tensor (the input itself when the group has one rank)."""
    if op not in ("sum", "max"):
        raise ValueError(f"unknown reduction {op!r}; expected 'sum' or 'max'")
    with torch.no_grad():
        return _collective("all_reduce" if op == "sum" else "all_reduce_max", tensor.detach(), group)


def barrier(group: str = "world") -> None:
    """Wait, on the host, for every rank of ``group``: a one-element all-reduce on the communication
    device whose result is then read on the host.

    Reading the result is what makes it a barrier on every backend: gloo's all-reduce returns when done,
    but NCCL's only enqueues the kernel (the call returns at once and the current stream waits), so a
    barrier before exit or around a save would otherwise let the host run on. ``.item()`` synchronises
    with the stream, i.e. returns only once every rank has contributed.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    all_reduce_over(torch.zeros(1, device=parallel_state.get_communication_device()), group).item()


def all_gather_objects(obj, group=None) -> list:
    """Every rank's picklable ``obj`` over ``group`` (a process group, default the world), in rank
    order. Object collectives pickle on the host; under NCCL torch stages them on the current CUDA
    device, which the launcher binding has set. A single process gets ``[obj]``."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj, src: int = 0, group=None):
    """Rank ``src``'s picklable ``obj`` on every rank of ``group`` (default the world)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src, group=group)
    return holder[0]


def monitored_barrier(group, timeout, wait_all_ranks: bool = True) -> None:
    """gloo's monitored barrier on ``group`` (a gloo group): raises naming the ranks that did not
    arrive within ``timeout`` (a timedelta). Used only to diagnose a failed collective."""
    dist.monitored_barrier(group=group, timeout=timeout, wait_all_ranks=wait_all_ranks)


# --- the collective guard (tests) ----------------------------------------------------------------
GUARD_ENV = "MEGATRON_TOKENFORMER_CHECK_COLLECTIVES"
#: torch.distributed functions that communicate; package code must reach them through this module
RAW_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "all_gather_object",
                   "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single", "broadcast",
                   "broadcast_object_list", "barrier", "reduce", "gather", "gather_object", "scatter", "all_to_all",
                   "all_to_all_single", "send", "recv", "isend", "irecv", "monitored_barrier")


def collective_guard_requested(environ=None) -> bool:
    environ = os.environ if environ is None else environ
    return environ.get(GUARD_ENV, "") not in ("", "0")


def _refuse_outside_choke_point(name, fn):
    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller != __name__ and (caller == "__main__" or caller.split(".")[0] == "megatron_tokenformer"):
            raise RuntimeError(f"torch.distributed.{name} called directly from {caller}; package collectives go "
                               f"through megatron_tokenformer.tensor_parallel.mappings")
        return fn(*args, **kwargs)
    guarded._megatron_tokenformer_guarded = True
    return guarded


def install_collective_guard() -> None:
    """Turn on the checks: tensors at the choke point must be on the communication device, and
    ``torch.distributed`` collectives called directly from package modules (or the entry script)
    raise. DeepSpeed's own calls pass. Idempotent."""
    global _GUARD
    _GUARD = True
    for name in RAW_COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is not None and not getattr(fn, "_megatron_tokenformer_guarded", False):
            setattr(dist, name, _refuse_outside_choke_point(name, fn))


# torch >= 2.13 renamed all_gather_into_tensor to all_gather_single
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
# ... and reduce_scatter_tensor to reduce_scatter_single
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# --- plain (non-autograd) helpers on the last dimension ------------------------------------------
def _split_last_dim(x: torch.Tensor) -> torch.Tensor:
    world = parallel_state.get_tensor_model_parallel_world_size()
    if world == 1:
        return x
    last = x.shape[-1]
    if last % world != 0:
        raise ValueError(f"last dimension {last} is not divisible by tensor-parallel size {world}")
    rank = parallel_state.get_tensor_model_parallel_rank()
    chunk = last // world
    return x[..., rank * chunk:(rank + 1) * chunk].contiguous()


def _all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """[..., c] on every rank -> [..., p*c], rank r's block at [r*c, (r+1)*c)."""
    world = parallel_state.get_tensor_model_parallel_world_size()
    gathered = _collective("all_gather", x.movedim(-1, 0))  # [p*c, ...]
    if world == 1:
        return x
    return gathered.movedim(0, -1).contiguous()


def _reduce_scatter_last_dim(x: torch.Tensor) -> torch.Tensor:
    """[..., p*c] partial sums -> [..., c] = this rank's block of the sum."""
    world = parallel_state.get_tensor_model_parallel_world_size()
    last = x.shape[-1]
    if last % world != 0:
        raise ValueError(f"last dimension {last} is not divisible by tensor-parallel size {world}")
    chunk = last // world
    blocks = x.reshape(x.shape[:-1] + (world, chunk)).movedim(-2, 0)  # [p, ..., c]
    out = _collective("reduce_scatter", blocks)
    if world == 1:
        return x
    return out.squeeze(0)


# --- plain (non-autograd) helpers on the sequence dimension (dim 1 of [b, s, ...]) ------------------
SEQUENCE_DIM = 1


def _split_seq(x: torch.Tensor) -> torch.Tensor:
    world = parallel_state.get_tensor_model_parallel_world_size()
    if world == 1:
        return x
    seq = x.shape[SEQUENCE_DIM]
    if seq % world != 0:
        raise ValueError(f"sequence length {seq} is not divisible by tensor-parallel size {world}")
    rank = parallel_state.get_tensor_model_parallel_rank()
    return x.narrow(SEQUENCE_DIM, rank * (seq // world), seq // world).contiguous()


def _all_gather_seq(x: torch.Tensor) -> torch.Tensor:
    """[b, s/p, ...] on every rank -> [b, s, ...], rank r's chunk at positions [r*s/p, (r+1)*s/p)."""
    world = parallel_state.get_tensor_model_parallel_world_size()
    gathered = _collective("all_gather", x.movedim(SEQUENCE_DIM, 0))  # [s, b, ...]
    if world == 1:
        return x
    return gathered.movedim(0, SEQUENCE_DIM).contiguous()


def _reduce_scatter_seq(x: torch.Tensor) -> torch.Tensor:
    """[b, s, ...] partial sums -> [b, s/p, ...] = this rank's sequence chunk of the sum."""
    world = parallel_state.get_tensor_model_parallel_world_size()
    if x.shape[SEQUENCE_DIM] % world != 0:
        raise ValueError(f"sequence length {x.shape[SEQUENCE_DIM]} is not divisible by tensor-parallel size {world}")
    out = _collective("reduce_scatter", x.movedim(SEQUENCE_DIM, 0))
    if world == 1:
        return x
    return out.movedim(0, SEQUENCE_DIM).contiguous()


# --- autograd functions --------------------------------------------------------------------------
class _CopyToTensorModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return _collective("all_reduce", grad)


class _ReduceFromTensorModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _collective("all_reduce", x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _ScatterToTensorModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _split_last_dim(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_last_dim(grad)


class _GatherFromTensorModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, output_grad_is_partial):
        ctx.output_grad_is_partial = output_grad_is_partial
        return _all_gather_last_dim(x)

    @staticmethod
    def backward(ctx, grad):
        if ctx.output_grad_is_partial:
            return _reduce_scatter_last_dim(grad), None
        return _split_last_dim(grad), None


class _ReduceScatterToTensorModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _reduce_scatter_last_dim(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_last_dim(grad)


class _AllReduceNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _collective("all_reduce", x)

    @staticmethod
    def backward(ctx, grad):
        return _collective("all_reduce", grad)


class _ScatterToSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _split_seq(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_seq(grad)


class _GatherFromSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, output_grad_is_partial):
        ctx.output_grad_is_partial = output_grad_is_partial
        return _all_gather_seq(x)

    @staticmethod
    def backward(ctx, grad):
        if ctx.output_grad_is_partial:
            return _reduce_scatter_seq(grad), None
        return _split_seq(grad), None


class _ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _reduce_scatter_seq(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_seq(grad)


def copy_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Identity forward; all-reduce of the gradient backward. x: replicated input of a parallel layer."""
    return _CopyToTensorModelParallelRegion.apply(x)


def reduce_from_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """All-reduce (sum) forward; identity backward. x: partial sums, result replicated."""
    return _ReduceFromTensorModelParallelRegion.apply(x)


def scatter_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """[..., d] replicated -> [..., d/p] own block; backward all-gather."""
    return _ScatterToTensorModelParallelRegion.apply(x)


def gather_from_tensor_model_parallel_region(x: torch.Tensor, output_grad_is_partial: bool = False) -> torch.Tensor:
    """[..., d/p] -> [..., d] (all-gather over the last dim).

    Backward: split (the gradient of the output is replicated), or reduce-scatter when
    ``output_grad_is_partial`` (each rank holds a partial sum of the output gradient).
    """
    return _GatherFromTensorModelParallelRegion.apply(x, output_grad_is_partial)


def reduce_scatter_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """[..., d] partial sums -> [..., d/p] (this rank's contiguous channel block of the sum).

    With head-major channels, block r holds exactly the heads of rank r. Backward: all-gather.
    """
    return _ReduceScatterToTensorModelParallelRegion.apply(x)


def scatter_to_sequence_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """[b, s, ...] replicated -> [b, s/p, ...] own sequence chunk; backward all-gather."""
    return _ScatterToSequenceParallelRegion.apply(x)


def gather_from_sequence_parallel_region(x: torch.Tensor, output_grad_is_partial: bool = True) -> torch.Tensor:
    """[b, s/p, ...] -> [b, s, ...] (all-gather along the sequence).

    Backward: reduce-scatter along the sequence when each rank holds a partial sum of the output
    gradient (the default: the consumer is a tensor-parallel layer), else split.
    """
    return _GatherFromSequenceParallelRegion.apply(x, output_grad_is_partial)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """[b, s, ...] partial sums -> [b, s/p, ...] this rank's sequence chunk of the sum; backward all-gather."""
    return _ReduceScatterToSequenceParallelRegion.apply(x)


def all_reduce_norm(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, forward AND backward (each rank uses the sum differently)."""
    return _AllReduceNorm.apply(x)


def all_reduce_max_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Element-wise max over ranks, detached from autograd."""
    with torch.no_grad():
        return _collective("all_reduce_max", x.detach())


def all_reduce_sum_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over the TP ranks, detached from autograd (the memory-lean Pattention function
    does its own backward and calls this for the forward and backward row statistics)."""
    with torch.no_grad():
        return _collective("all_reduce", x.detach())


# --- context parallelism (the sequence dimension, over the context-parallel group) ----------------
def _all_gather_seq_context(x: torch.Tensor, dim: int) -> torch.Tensor:
    """[..., s_local (dim), ...] on every context-parallel rank -> [..., cp * s_local, ...], rank r's
    tokens at block r."""
    world = parallel_state.get_context_parallel_world_size()
    gathered = _collective("all_gather", x.movedim(dim, 0), "context")
    if world == 1:
        return x
    return gathered.movedim(0, dim).contiguous()


def _reduce_scatter_seq_context(x: torch.Tensor, dim: int) -> torch.Tensor:
    """[..., cp * s_local, ...] partial sums -> this rank's block [..., s_local, ...] of their sum."""
    world = parallel_state.get_context_parallel_world_size()
    out = _collective("reduce_scatter", x.movedim(dim, 0), "context")
    if world == 1:
        return x
    return out.movedim(0, dim).contiguous()


class _GatherFromContextParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim):
        ctx.dim = dim
        return _all_gather_seq_context(x, dim)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_seq_context(grad, ctx.dim), None


class _AllReduceLossOverContextParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _collective("all_reduce", x, "context")

    @staticmethod
    def backward(ctx, grad):
        return grad * parallel_state.get_context_parallel_world_size()


def gather_from_context_parallel_region(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """All-gather along the sequence dimension ``dim`` over the context-parallel group:
    [.., s_local, ..] -> [.., cp * s_local, ..] (rank r's tokens at block r, in the rank's own order).
    Backward: reduce-scatter (the gathered tensor's gradient is a per-rank partial sum)."""
    return _GatherFromContextParallelRegion.apply(x, dim)


def all_reduce_loss_over_context_parallel(x: torch.Tensor) -> torch.Tensor:
    """Sum over the context-parallel group forward (each rank's share of a loss -> the whole loss, the same
    on every rank); backward the gradient times cp: the gradient reduction averages over DP x CP ranks
    (DeepSpeed divides by their number), each of which back-propagates only its own tokens' share."""
    return _AllReduceLossOverContextParallel.apply(x)
