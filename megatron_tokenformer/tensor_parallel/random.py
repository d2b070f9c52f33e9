"""Random numbers under tensor parallelism.

Two mechanisms:

1. **Layout-independent parameter init** (:func:`init_partitioned_`): every parameter's FULL master
   tensor is drawn from its own ``torch.Generator`` seeded from ``(seed, layer_number, tag)`` and the
   rank keeps its slice. The result depends neither on the tensor/pipeline sizes nor on the order in
   which modules are built, so TP=1 and TP=4 (PP=1 and PP=2) start bitwise identical.

2. **An RNG states tracker** (Megatron's ``get_cuda_rng_tracker``, but CPU-capable): named RNG
   states that can be entered with ``fork(name)``. After :func:`model_parallel_seed(seed)`, the
   default generator is seeded identically on all tensor-parallel ranks (same numbers, e.g. for
   dropout on replicated activations), and ``fork("model-parallel-rng")`` switches to a state that
   differs per tensor-parallel rank (e.g. dropout inside a partitioned region). The tracker saves and
   restores the CPU generator and, when CUDA is available, the current device's generator.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Dict, Optional, Sequence

import torch

from megatron_tokenformer import parallel_state

_MODEL_PARALLEL_RNG_TRACKER_NAME = "model-parallel-rng"
_TP_SEED_OFFSET = 2718


def parameter_seed(seed: int, layer_number: int, tag: str) -> int:
    """Deterministic 63-bit seed for one parameter, from (init seed, layer number, parameter tag)."""
    digest = hashlib.sha256(f"{int(seed)}/{int(layer_number)}/{tag}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def parameter_generator(seed: int, layer_number: int, tag: str) -> torch.Generator:
    """A fresh CPU generator for one parameter's master tensor."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(parameter_seed(seed, layer_number, tag))
    return gen


def master_normal(shape: Sequence[int], std: float, seed: int, layer_number: int, tag: str) -> torch.Tensor:
    """The full fp32 master tensor N(0, std^2) of one parameter (CPU)."""
    gen = parameter_generator(seed, layer_number, tag)
    return torch.empty(tuple(shape), dtype=torch.float32).normal_(0.0, float(std), generator=gen)


def init_partitioned_(param: torch.Tensor, full_shape: Sequence[int], std: float, seed: int, layer_number: int,
                      tag: str, partition_dim: int = 0, rank: Optional[int] = None,
                      world_size: Optional[int] = None, valid_rows: Optional[int] = None) -> torch.Tensor:
    """Fill ``param`` with this rank's slice of the full master tensor N(0, std^2).

    full_shape: global shape; ``param`` must have the shape of one of ``world_size`` equal contiguous
    blocks of it along ``partition_dim`` (``world_size``/``rank`` default to the tensor-parallel ones;
    pass world_size=1 for a replicated parameter).
    valid_rows: if given, only the first ``valid_rows`` entries along dim 0 of the master tensor are
    random and the rest are zero (vocabulary padding), so the random part does not depend on padding.
    """
    if world_size is None:
        world_size = parallel_state.get_tensor_model_parallel_world_size()
    if rank is None:
        rank = parallel_state.get_tensor_model_parallel_rank() if world_size > 1 else 0
    full_shape = tuple(full_shape)
    if valid_rows is None:
        master = master_normal(full_shape, std, seed, layer_number, tag)
    else:
        master = torch.zeros(full_shape, dtype=torch.float32)
        master[:valid_rows] = master_normal((valid_rows,) + full_shape[1:], std, seed, layer_number, tag)
    if world_size > 1:
        master = master.chunk(world_size, dim=partition_dim)[rank]
    if tuple(master.shape) != tuple(param.shape):
        raise ValueError(f"parameter {tag!r}: shard shape {tuple(param.shape)} does not match the slice "
                         f"{tuple(master.shape)} of master shape {full_shape} (world {world_size})")
    with torch.no_grad():
        param.copy_(master.to(dtype=param.dtype, device=param.device))
    return param


def set_tensor_model_parallel_attributes(param: torch.Tensor, is_parallel: bool, partition_dim: int) -> None:
    """Mark a parameter the way Megatron does (read by resharding and grad-norm code)."""
    param.tensor_model_parallel = is_parallel
    param.partition_dim = partition_dim
    param.partition_stride = 1


# --- RNG states tracker ---------------------------------------------------------------------------
def _get_states():
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_states(states) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


class RNGStatesTracker:
    """Named RNG states (CPU and, when present, CUDA) that can be temporarily switched to."""

    def __init__(self):
        self.states_: Dict[str, dict] = {}
        self.seeds_ = set()

    def reset(self) -> None:
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self) -> Dict[str, dict]:
        return {k: {kk: vv.clone() for kk, vv in v.items()} for k, v in self.states_.items()}

    def set_states(self, states: Dict[str, dict]) -> None:
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already exists in the RNG tracker")
        if name in self.states_:
            raise ValueError(f"RNG state {name!r} already exists in the RNG tracker")
        self.seeds_.add(seed)
        saved = _get_states()
        torch.manual_seed(seed)  # seeds CPU and all CUDA devices
        self.states_[name] = _get_states()
        _set_states(saved)

    @contextlib.contextmanager
    def fork(self, name: str = _MODEL_PARALLEL_RNG_TRACKER_NAME):
        """Run the block with RNG state ``name``; the state advances, the outer state is restored."""
        if name not in self.states_:
            raise KeyError(f"RNG state {name!r} is not in the tracker (call model_parallel_seed first)")
        saved = _get_states()
        _set_states(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = _get_states()
            _set_states(saved)


_RNG_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    return _RNG_TRACKER


get_cuda_rng_tracker = get_rng_tracker  # Megatron's name


def model_parallel_seed(seed: int) -> None:
    """Seed the default generators identically on the TP group, and a per-TP-rank tracked state.

    Default state: ``seed`` (callers add the pipeline/data-parallel offsets they want).
    ``fork("model-parallel-rng")``: ``seed + 2718 + tp_rank``.
    """
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    torch.manual_seed(seed)
    _RNG_TRACKER.reset()
    _RNG_TRACKER.add(_MODEL_PARALLEL_RNG_TRACKER_NAME, seed + _TP_SEED_OFFSET + tp_rank)


model_parallel_cuda_manual_seed = model_parallel_seed  # Megatron's name
