"""Resharding: placing a checkpoint source's full tensors into a model at ANY parallel layout.

A :class:`~.format.source.CheckpointSource` (a step folder's :class:`~.format.view.CheckpointView`,
or a grown/widened one) holds every parameter whole under its canonical name. For a target layout
(tp, pp, dp):

* :func:`target_layout`: the layout dict a converted checkpoint records (sizes not given keep the
  source's);
* :func:`param_slices`: for each parameter of this rank's module, its canonical entry and a reader
  of the TP slice this rank holds (vocabulary re-padded for the target TP), shape-checked;
* :func:`load_module_from_view`: sets a plain module's parameters from the fp32 masters (evaluation,
  export). The DeepSpeed engine's optimizer state is placed by
  :func:`~.io.load_view_into_engine` on top of :func:`param_slices`.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch

from megatron_tokenformer import parallel_state
from megatron_tokenformer.checkpointing.format.entries import FP32, CheckpointMismatchError, ParamEntry
from megatron_tokenformer.model.naming import canonical_parameter_names

__all__ = ["target_layout", "layout_tuple", "param_slices", "load_module_from_view"]


def layout_tuple(layout: Dict[str, Any]) -> Tuple[int, int, int]:
    """(tp, pp, dp) of a layout dict (missing sizes count as 1)."""
    return (int(layout.get("tensor_model_parallel_size", 1)), int(layout.get("pipeline_model_parallel_size", 1)),
            int(layout.get("data_parallel_size", 1)))


def target_layout(source_layout: Dict[str, Any], tp: Optional[int] = None, pp: Optional[int] = None,
                  dp: Optional[int] = None) -> Dict[str, int]:
    """The layout dict of a conversion to (tp, pp, dp); a size not given keeps the source's.

    ValueError naming the ``--target-...`` flag for a size below 1.
    """
    src_tp, src_pp, src_dp = layout_tuple(source_layout)
    tp, pp, dp = tp or src_tp, pp or src_pp, dp or src_dp
    for flag, value in (("--target-tensor-model-parallel-size", tp), ("--target-pipeline-model-parallel-size", pp),
                        ("--target-data-parallel-size", dp)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    return {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp, "data_parallel_size": dp,
            "world_size": tp * pp * dp}


def param_slices(module: torch.nn.Module, view, config) -> Iterator[Tuple[str, torch.nn.Parameter, str, ParamEntry,
                                                                          Callable[[str], torch.Tensor]]]:
    """Yield ``(local name, param, canonical name, entry, read)`` for every parameter of ``module``;
    ``read(key)`` returns this rank's TP slice of tensor ``key`` (fp32, the parameter's local shape).

    ``view`` is a :class:`~.format.view.CheckpointView` (anything with ``params``, ``step_dir`` and
    ``read_tp_slice``); the TP rank and size are this process's (:mod:`~megatron_tokenformer.parallel_state`).
    Raises :class:`CheckpointMismatchError` for a missing parameter, a partitioning or a shape that differs.
    """
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    padded = config.padded_vocab_size(tp)
    names = canonical_parameter_names(module)
    missing = sorted({c for c in names.values() if c not in view.params})
    if missing:
        raise CheckpointMismatchError(f"{view.step_dir} lacks parameters the model has: {', '.join(missing[:10])}"
                                      + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""))
    for local_name, param in module.named_parameters():
        cname = names[local_name]
        entry = view.params[cname]
        pdim = int(getattr(param, "partition_dim", 0)) if getattr(param, "tensor_model_parallel", False) else None
        if (pdim is None) != (entry.partition_dim is None):
            raise CheckpointMismatchError(f"{cname}: partitioned={pdim is not None} in the model but "
                                          f"{entry.partition_dim is not None} in {view.step_dir}")
        r, w = (tp_rank, tp) if pdim is not None else (0, 1)

        def read(key, cname=cname, entry=entry, r=r, w=w, param=param):
            value = view.read_tp_slice(cname, key, r, w, padded if entry.vocab else None)
            if tuple(value.shape) != tuple(param.shape):
                raise CheckpointMismatchError(f"{cname}: the model's shard has shape {tuple(param.shape)} but the "
                                              f"checkpoint gives {tuple(value.shape)} for tensor rank {r} of {w}")
            return value

        yield local_name, param, cname, entry, read


def load_module_from_view(module: torch.nn.Module, view, config) -> None:
    """Set every parameter of ``module`` (this rank's TP slice) from the view's fp32 master weights.

    For evaluation and export without DeepSpeed; training uses :func:`~.io.load_view_into_engine`.
    """
    with torch.no_grad():
        for _, param, _, _, read in param_slices(module, view, config):
            param.data.copy_(read(FP32).to(param.dtype))
