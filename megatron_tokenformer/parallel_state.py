"""Tensor-, context-, pipeline- and data-parallel process groups.

The rank layout is DeepSpeed's ``PipeModelDataParallelTopology``: axes (pipe, data, model) with the
model (tensor-parallel) axis fastest, so the ranks of one tensor-parallel group are adjacent. Context
parallelism (``--context-parallel-size`` cp, Megatron's order tp < cp < dp < pp) sits between the
tensor and data axes::

    global_rank = pp_rank * (dp * cp * tp) + dp_rank * (cp * tp) + cp_rank * tp + tp_rank

so DeepSpeed, which knows no context parallelism, sees a (pipe, data, model) topology whose data axis
is DP x CP (data index dp_rank * cp + cp_rank): parameters are replicated over CP as over DP, so
gradients are reduced (and ZeRO partitions) over the DP x CP group
(``get_data_parallel_group(with_context_parallel=True)``; :func:`deepspeed_mpu` hands DeepSpeed that
group). The data-parallel group proper (the sampler's rank) is DP only.

Names follow Megatron-LM (``get_tensor_model_parallel_group`` ...). The module object itself can be
handed to ``deepspeed.initialize(mpu=parallel_state)``: it also provides the names DeepSpeed calls
(``get_model_parallel_*`` for the tensor x pipeline "slice" of one data-parallel replica,
``get_pipe_parallel_*``, ``get_data_parallel_group_ranks``).

When ``torch.distributed`` is not initialised (or ``initialize_model_parallel`` was not called),
every ``get_*_world_size()`` returns 1 and every ``get_*_rank()`` returns 0, so single-process code
(tests, tools, the drop-in modules) works without process groups. Group getters return ``None``
in that case.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist

_TENSOR_MODEL_PARALLEL_GROUP = None
_PIPELINE_MODEL_PARALLEL_GROUP = None
_DATA_PARALLEL_GROUP = None
_MODEL_PARALLEL_GROUP = None
_CONTEXT_PARALLEL_GROUP = None
_DATA_CONTEXT_PARALLEL_GROUP = None

_TENSOR_MODEL_PARALLEL_RANKS: Optional[List[int]] = None
_PIPELINE_MODEL_PARALLEL_RANKS: Optional[List[int]] = None
_DATA_PARALLEL_RANKS: Optional[List[int]] = None
_MODEL_PARALLEL_RANKS: Optional[List[int]] = None
_CONTEXT_PARALLEL_RANKS: Optional[List[int]] = None
_DATA_CONTEXT_PARALLEL_RANKS: Optional[List[int]] = None

_SIZES = None  # (tp, pp, dp, cp) once initialised
_TOPOLOGY = None
_COMMUNICATION_DEVICE: Optional[torch.device] = None


# --- the communication device ------------------------------------------------------------------
def choose_communication_device(cuda_available: bool, current_cuda_device: Optional[int]) -> torch.device:
    """The device every collective's tensors live on: this process's CUDA device when CUDA is
    present (NCCL has no CPU backend), the CPU otherwise (gloo). Pure: the caller passes what it sees.
    """
    if cuda_available:
        if current_cuda_device is None:
            raise ValueError("CUDA is available but no current CUDA device was given")
        return torch.device("cuda", int(current_cuda_device))
    return torch.device("cpu")


def set_communication_device(device: Optional[torch.device]) -> None:
    """Fix the communication device (once, at start-up, after the CUDA device is bound).
    ``None`` forgets it (tests)."""
    global _COMMUNICATION_DEVICE
    _COMMUNICATION_DEVICE = None if device is None else torch.device(device)


def get_communication_device() -> torch.device:
    """The device collectives run on: the one set at start-up, else chosen from the current CUDA device."""
    global _COMMUNICATION_DEVICE
    if _COMMUNICATION_DEVICE is None:
        cuda = torch.cuda.is_available()
        _COMMUNICATION_DEVICE = choose_communication_device(cuda, torch.cuda.current_device() if cuda else None)
    return _COMMUNICATION_DEVICE


def rank_layout(world_size: int, tensor_model_parallel_size: int, pipeline_model_parallel_size: int,
                context_parallel_size: int = 1):
    """The rank lists of every group, without creating any process group.

    Returns a dict with keys ``"tensor"``, ``"pipeline"``, ``"data"``, ``"model"``, ``"context"`` and
    ``"data_context"`` (the DP x CP ranks of one (pipeline, tensor) position), each a list of rank lists
    (one list per group). Raises ValueError when the sizes do not tile the world.
    """
    tp, pp, cp = tensor_model_parallel_size, pipeline_model_parallel_size, context_parallel_size
    if tp < 1 or pp < 1 or cp < 1:
        raise ValueError(f"tensor_model_parallel_size ({tp}), pipeline_model_parallel_size ({pp}) and "
                         f"context_parallel_size ({cp}) must be >= 1")
    if world_size % (tp * pp * cp) != 0:
        what = (f"tensor_model_parallel_size ({tp}) x pipeline_model_parallel_size ({pp})" if cp == 1 else
                f"tensor_model_parallel_size ({tp}) x pipeline_model_parallel_size ({pp}) x "
                f"context_parallel_size ({cp})")
        raise ValueError(f"world size {world_size} is not divisible by {what} = {tp * pp * cp}")
    dp = world_size // (tp * pp * cp)

    def rank(p, d, c, t):
        return p * (dp * cp * tp) + d * (cp * tp) + c * tp + t

    P, D, C, T = range(pp), range(dp), range(cp), range(tp)
    return {
        "tensor": [[rank(p, d, c, t) for t in T] for p in P for d in D for c in C],
        "pipeline": [[rank(p, d, c, t) for p in P] for d in D for c in C for t in T],
        "data": [[rank(p, d, c, t) for d in D] for p in P for c in C for t in T],
        "model": [[rank(p, d, c, t) for p in P for t in T] for d in D for c in C],
        "context": [[rank(p, d, c, t) for c in C] for p in P for d in D for t in T],
        "data_context": [[rank(p, d, c, t) for d in D for c in C] for p in P for t in T],
    }


def initialize_model_parallel(tensor_model_parallel_size: int = 1,
                              pipeline_model_parallel_size: int = 1,
                              context_parallel_size: int = 1) -> None:
    """Create the process groups. ``torch.distributed`` must be initialised; every rank must call this.

    Works with any backend (gloo on CPU, nccl on GPU): the groups use the default backend.
    """
    global _TENSOR_MODEL_PARALLEL_GROUP, _PIPELINE_MODEL_PARALLEL_GROUP, _DATA_PARALLEL_GROUP
    global _MODEL_PARALLEL_GROUP, _TENSOR_MODEL_PARALLEL_RANKS, _PIPELINE_MODEL_PARALLEL_RANKS
    global _DATA_PARALLEL_RANKS, _MODEL_PARALLEL_RANKS, _SIZES, _TOPOLOGY
    global _CONTEXT_PARALLEL_GROUP, _CONTEXT_PARALLEL_RANKS, _DATA_CONTEXT_PARALLEL_GROUP, _DATA_CONTEXT_PARALLEL_RANKS
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("initialize_model_parallel() needs torch.distributed to be initialised first "
                           "(torch.distributed.init_process_group or deepspeed.init_distributed)")
    if model_parallel_is_initialized():
        raise RuntimeError("model parallel groups are already initialised; call destroy_model_parallel() first")
    world = dist.get_world_size()
    me = dist.get_rank()
    layout = rank_layout(world, tensor_model_parallel_size, pipeline_model_parallel_size, context_parallel_size)

    def build(kind):
        mine = None
        for ranks in layout[kind]:  # every rank creates every group, in the same order
            group = dist.new_group(ranks=ranks)
            if me in ranks:
                mine = (group, ranks)
        return mine

    _TENSOR_MODEL_PARALLEL_GROUP, _TENSOR_MODEL_PARALLEL_RANKS = build("tensor")
    _PIPELINE_MODEL_PARALLEL_GROUP, _PIPELINE_MODEL_PARALLEL_RANKS = build("pipeline")
    _DATA_PARALLEL_GROUP, _DATA_PARALLEL_RANKS = build("data")
    _MODEL_PARALLEL_GROUP, _MODEL_PARALLEL_RANKS = build("model")
    tp, pp, cp = tensor_model_parallel_size, pipeline_model_parallel_size, context_parallel_size
    if cp > 1:  # the same groups as "data" (and no new process group) when cp = 1
        _CONTEXT_PARALLEL_GROUP, _CONTEXT_PARALLEL_RANKS = build("context")
        _DATA_CONTEXT_PARALLEL_GROUP, _DATA_CONTEXT_PARALLEL_RANKS = build("data_context")
    _SIZES = (tp, pp, world // (tp * pp * cp), cp)
    _TOPOLOGY = None


def model_parallel_is_initialized() -> bool:
    return _SIZES is not None


def destroy_model_parallel() -> None:
    """Destroy this rank's groups of :func:`initialize_model_parallel` and forget them.

    Destroying (not only forgetting) matters to a process that re-initialises with another layout (tests,
    a tool): each live gloo group keeps a thread that wakes a hundred times a second. Nothing collective:
    each rank destroys its own handles (none after ``torch.distributed.destroy_process_group()``). As with
    ``torch.distributed.destroy_process_group``, call it once every rank is done with the groups (after a
    barrier): a peer still sending over a destroyed group sees its connection closed.
    """
    global _TENSOR_MODEL_PARALLEL_GROUP, _PIPELINE_MODEL_PARALLEL_GROUP, _DATA_PARALLEL_GROUP
    global _MODEL_PARALLEL_GROUP, _TENSOR_MODEL_PARALLEL_RANKS, _PIPELINE_MODEL_PARALLEL_RANKS
    global _DATA_PARALLEL_RANKS, _MODEL_PARALLEL_RANKS, _SIZES, _TOPOLOGY
    global _CONTEXT_PARALLEL_GROUP, _CONTEXT_PARALLEL_RANKS, _DATA_CONTEXT_PARALLEL_GROUP, _DATA_CONTEXT_PARALLEL_RANKS
    groups = (_TENSOR_MODEL_PARALLEL_GROUP, _PIPELINE_MODEL_PARALLEL_GROUP, _DATA_PARALLEL_GROUP,
              _MODEL_PARALLEL_GROUP, _CONTEXT_PARALLEL_GROUP, _DATA_CONTEXT_PARALLEL_GROUP)
    if dist.is_available() and dist.is_initialized():
        for group in {id(g): g for g in groups if g is not None}.values():
            if group is not dist.GroupMember.WORLD and group != dist.GroupMember.NON_GROUP_MEMBER:
                try:
                    dist.destroy_process_group(group)
                except ValueError:  # not a live group any more (destroyed by its user)
                    pass
    _CONTEXT_PARALLEL_GROUP = _DATA_CONTEXT_PARALLEL_GROUP = None
    _CONTEXT_PARALLEL_RANKS = _DATA_CONTEXT_PARALLEL_RANKS = None
    _TENSOR_MODEL_PARALLEL_GROUP = _PIPELINE_MODEL_PARALLEL_GROUP = None
    _DATA_PARALLEL_GROUP = _MODEL_PARALLEL_GROUP = None
    _TENSOR_MODEL_PARALLEL_RANKS = _PIPELINE_MODEL_PARALLEL_RANKS = None
    _DATA_PARALLEL_RANKS = _MODEL_PARALLEL_RANKS = None
    _SIZES = None
    _TOPOLOGY = None


def _global_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _rank_in(ranks: Optional[List[int]]) -> int:
    return 0 if ranks is None else ranks.index(_global_rank())


def _size_of(ranks: Optional[List[int]]) -> int:
    return 1 if ranks is None else len(ranks)


# --- tensor model parallel ---------------------------------------------------------------------
def get_tensor_model_parallel_group():
    return _TENSOR_MODEL_PARALLEL_GROUP


def get_tensor_model_parallel_world_size() -> int:
    return _size_of(_TENSOR_MODEL_PARALLEL_RANKS)


def get_tensor_model_parallel_rank() -> int:
    return _rank_in(_TENSOR_MODEL_PARALLEL_RANKS)


def get_tensor_model_parallel_src_rank() -> int:
    """Global rank of tensor-parallel rank 0 in the caller's group."""
    return _global_rank() if _TENSOR_MODEL_PARALLEL_RANKS is None else _TENSOR_MODEL_PARALLEL_RANKS[0]


def get_tensor_model_parallel_ranks() -> List[int]:
    return [_global_rank()] if _TENSOR_MODEL_PARALLEL_RANKS is None else list(_TENSOR_MODEL_PARALLEL_RANKS)


# --- pipeline model parallel -------------------------------------------------------------------
def get_pipeline_model_parallel_group():
    return _PIPELINE_MODEL_PARALLEL_GROUP


def get_pipeline_model_parallel_world_size() -> int:
    return _size_of(_PIPELINE_MODEL_PARALLEL_RANKS)


def get_pipeline_model_parallel_rank() -> int:
    return _rank_in(_PIPELINE_MODEL_PARALLEL_RANKS)


def get_pipeline_model_parallel_ranks() -> List[int]:
    return [_global_rank()] if _PIPELINE_MODEL_PARALLEL_RANKS is None else list(_PIPELINE_MODEL_PARALLEL_RANKS)


def is_pipeline_first_stage() -> bool:
    return get_pipeline_model_parallel_rank() == 0


def is_pipeline_last_stage() -> bool:
    return get_pipeline_model_parallel_rank() == get_pipeline_model_parallel_world_size() - 1


# DeepSpeed's grid names for the same thing
get_pipe_parallel_group = get_pipeline_model_parallel_group
get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size
get_pipe_parallel_rank = get_pipeline_model_parallel_rank


# --- data parallel (with_context_parallel: the DP x CP ranks that hold the same parameters) ----------
def get_data_parallel_group(with_context_parallel: bool = False):
    if with_context_parallel and _DATA_CONTEXT_PARALLEL_RANKS is not None:
        return _DATA_CONTEXT_PARALLEL_GROUP
    return _DATA_PARALLEL_GROUP


def get_data_parallel_world_size(with_context_parallel: bool = False) -> int:
    if with_context_parallel and _DATA_CONTEXT_PARALLEL_RANKS is not None:
        return _size_of(_DATA_CONTEXT_PARALLEL_RANKS)
    return _size_of(_DATA_PARALLEL_RANKS)


def get_data_parallel_rank(with_context_parallel: bool = False) -> int:
    if with_context_parallel and _DATA_CONTEXT_PARALLEL_RANKS is not None:
        return _rank_in(_DATA_CONTEXT_PARALLEL_RANKS)
    return _rank_in(_DATA_PARALLEL_RANKS)


def get_data_parallel_group_ranks(with_context_parallel: bool = False) -> List[int]:
    ranks = _DATA_CONTEXT_PARALLEL_RANKS if with_context_parallel and _DATA_CONTEXT_PARALLEL_RANKS is not None \
        else _DATA_PARALLEL_RANKS
    return [_global_rank()] if ranks is None else list(ranks)


# --- context parallel: the ranks that split the same sequences (docs/design.md, context parallelism) ---
def get_context_parallel_group():
    return _CONTEXT_PARALLEL_GROUP


def get_context_parallel_world_size() -> int:
    return _size_of(_CONTEXT_PARALLEL_RANKS)


def get_context_parallel_rank() -> int:
    return _rank_in(_CONTEXT_PARALLEL_RANKS)


def get_context_parallel_ranks() -> List[int]:
    return [_global_rank()] if _CONTEXT_PARALLEL_RANKS is None else list(_CONTEXT_PARALLEL_RANKS)


# --- model parallel = tensor x pipeline ranks of one data-parallel replica (DeepSpeed's "mpu") ----
def get_model_parallel_group():
    return _MODEL_PARALLEL_GROUP


def get_model_parallel_world_size() -> int:
    return _size_of(_MODEL_PARALLEL_RANKS)


def get_model_parallel_rank() -> int:
    return _rank_in(_MODEL_PARALLEL_RANKS)


class _DeepSpeedMPU:
    """What ``deepspeed.initialize(mpu=...)`` calls, with the data-parallel names answering for the
    DP x CP group (gradient reduction, ZeRO partitioning, DeepSpeed's batch-size arithmetic)."""

    def __getattr__(self, name):  # everything else: this module's function of that name
        try:
            return globals()[name]
        except KeyError:
            raise AttributeError(name) from None

    @staticmethod
    def get_data_parallel_group():
        return get_data_parallel_group(with_context_parallel=True)

    @staticmethod
    def get_data_parallel_world_size():
        return get_data_parallel_world_size(with_context_parallel=True)

    @staticmethod
    def get_data_parallel_rank():
        return get_data_parallel_rank(with_context_parallel=True)

    @staticmethod
    def get_data_parallel_group_ranks():
        return get_data_parallel_group_ranks(with_context_parallel=True)


def deepspeed_mpu():
    """The model-parallel unit for ``deepspeed.initialize`` at PP = 1: this module itself without context
    parallelism; with it, a view whose data-parallel group is DP x CP."""
    import sys
    return sys.modules[__name__] if get_context_parallel_world_size() == 1 else _DeepSpeedMPU()


def get_topology():
    """DeepSpeed's ``PipeModelDataParallelTopology`` for the current sizes (created lazily): its data axis
    is DP x CP (data index ``dp_rank * cp + cp_rank``, the same global ranks as this module's layout).

    Without initialised groups it describes a single process (1, 1, 1).
    """
    global _TOPOLOGY
    if _TOPOLOGY is None:
        from megatron_tokenformer.deepspeed_boundary import pipe_topology
        tp, pp, dp, cp = _SIZES if _SIZES is not None else (1, 1, 1, 1)
        _TOPOLOGY = pipe_topology(num_pp=pp, num_mp=tp, num_dp=dp * cp)
    return _TOPOLOGY
