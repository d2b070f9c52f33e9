"""Tensor-, pipeline- and data-parallel process groups.

The rank layout is DeepSpeed's ``PipeModelDataParallelTopology``: axes (pipe, data, model) with the
model (tensor-parallel) axis fastest, so the ranks of one tensor-parallel group are adjacent::

    global_rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

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

_TENSOR_MODEL_PARALLEL_RANKS: Optional[List[int]] = None
_PIPELINE_MODEL_PARALLEL_RANKS: Optional[List[int]] = None
_DATA_PARALLEL_RANKS: Optional[List[int]] = None
_MODEL_PARALLEL_RANKS: Optional[List[int]] = None

_SIZES = None  # (tp, pp, dp) once initialised
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


def rank_layout(world_size: int, tensor_model_parallel_size: int, pipeline_model_parallel_size: int):
    """The rank lists of every group, without creating any process group.

    Returns a dict with keys ``"tensor"``, ``"pipeline"``, ``"data"``, ``"model"``, each a list of
    rank lists (one list per group). Raises ValueError when the sizes do not tile the world.
    """
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    if tp < 1 or pp < 1:
        raise ValueError(
            f"tensor_model_parallel_size ({tp}) and pipeline_model_parallel_size ({pp}) must be >= 1")
    if world_size % (tp * pp) != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor_model_parallel_size ({tp}) x "
            f"pipeline_model_parallel_size ({pp}) = {tp * pp}")
    dp = world_size // (tp * pp)

    def rank(p, d, t):
        return p * (dp * tp) + d * tp + t

    return {
        "tensor": [[rank(p, d, t) for t in range(tp)] for p in range(pp) for d in range(dp)],
        "pipeline": [[rank(p, d, t) for p in range(pp)] for d in range(dp) for t in range(tp)],
        "data": [[rank(p, d, t) for d in range(dp)] for p in range(pp) for t in range(tp)],
        "model": [[rank(p, d, t) for p in range(pp) for t in range(tp)] for d in range(dp)],
    }


def initialize_model_parallel(tensor_model_parallel_size: int = 1,
                              pipeline_model_parallel_size: int = 1) -> None:
    """Create the process groups. ``torch.distributed`` must be initialised; every rank must call this.

    Works with any backend (gloo on CPU, nccl on GPU): the groups use the default backend.
    """
    global _TENSOR_MODEL_PARALLEL_GROUP, _PIPELINE_MODEL_PARALLEL_GROUP, _DATA_PARALLEL_GROUP
    global _MODEL_PARALLEL_GROUP, _TENSOR_MODEL_PARALLEL_RANKS, _PIPELINE_MODEL_PARALLEL_RANKS
    global _DATA_PARALLEL_RANKS, _MODEL_PARALLEL_RANKS, _SIZES, _TOPOLOGY
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("initialize_model_parallel() needs torch.distributed to be initialised first "
                           "(torch.distributed.init_process_group or deepspeed.init_distributed)")
    if model_parallel_is_initialized():
        raise RuntimeError("model parallel groups are already initialised; call destroy_model_parallel() first")
    world = dist.get_world_size()
    me = dist.get_rank()
    layout = rank_layout(world, tensor_model_parallel_size, pipeline_model_parallel_size)

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
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    _SIZES = (tp, pp, world // (tp * pp))
    _TOPOLOGY = None


def model_parallel_is_initialized() -> bool:
    return _SIZES is not None


def destroy_model_parallel() -> None:
    """Forget the groups (the process groups themselves are left to torch.distributed)."""
    global _TENSOR_MODEL_PARALLEL_GROUP, _PIPELINE_MODEL_PARALLEL_GROUP, _DATA_PARALLEL_GROUP
    global _MODEL_PARALLEL_GROUP, _TENSOR_MODEL_PARALLEL_RANKS, _PIPELINE_MODEL_PARALLEL_RANKS
    global _DATA_PARALLEL_RANKS, _MODEL_PARALLEL_RANKS, _SIZES, _TOPOLOGY
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


# --- data parallel -----------------------------------------------------------------------------
def get_data_parallel_group():
    return _DATA_PARALLEL_GROUP


def get_data_parallel_world_size() -> int:
    return _size_of(_DATA_PARALLEL_RANKS)


def get_data_parallel_rank() -> int:
    return _rank_in(_DATA_PARALLEL_RANKS)


def get_data_parallel_group_ranks() -> List[int]:
    return [_global_rank()] if _DATA_PARALLEL_RANKS is None else list(_DATA_PARALLEL_RANKS)


# --- model parallel = tensor x pipeline ranks of one data-parallel replica (DeepSpeed's "mpu") ----
def get_model_parallel_group():
    return _MODEL_PARALLEL_GROUP


def get_model_parallel_world_size() -> int:
    return _size_of(_MODEL_PARALLEL_RANKS)


def get_model_parallel_rank() -> int:
    return _rank_in(_MODEL_PARALLEL_RANKS)


def get_topology():
    """DeepSpeed's ``PipeModelDataParallelTopology`` for the current sizes (created lazily).

    Without initialised groups it describes a single process (1, 1, 1).
    """
    global _TOPOLOGY
    if _TOPOLOGY is None:
        from megatron_tokenformer.deepspeed_boundary import pipe_topology
        tp, pp, dp = _SIZES if _SIZES is not None else (1, 1, 1)
        _TOPOLOGY = pipe_topology(num_pp=pp, num_mp=tp, num_dp=dp)
    return _TOPOLOGY
