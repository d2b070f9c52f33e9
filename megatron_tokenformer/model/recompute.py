"""Activation recomputation (Megatron's ``--recompute-granularity / --recompute-method / --recompute-num-layers``).

- ``full``: whole blocks are recomputed in the backward pass; only their inputs are kept.
  ``uniform``: the stage's blocks in consecutive chunks of ``recompute_num_layers``, each chunk one
  checkpoint (only the chunk's input is kept). ``block``: the first ``recompute_num_layers`` blocks of
  the stage each recomputed on its own, the rest not at all (less recomputation, more memory).
- ``selective``: only the attention core (rotary, QKᵀ, softmax, ·V: :meth:`ParallelAttention.core_attention`)
  is recomputed. The Pattention normalisations are always recomputed in backward by the memory-lean
  function (:mod:`megatron_tokenformer.ops.pattention_norm`), with or without this flag.

All checkpoints are torch's non-reentrant ``torch.utils.checkpoint.checkpoint``. The model has no
dropout, so recomputation reproduces the forward exactly (losses and gradients equal to no recomputation).
"""

from __future__ import annotations

import functools
from typing import Callable, List, Sequence, Tuple

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["full_recompute_chunks", "run_layers", "apply_block_recompute_to_pipeline", "checkpointed"]


def full_recompute_chunks(num_layers: int, granularity, method, recompute_num_layers) -> List[Tuple[int, int, bool]]:
    """Split ``num_layers`` consecutive blocks into ``(start, stop, recompute)`` chunks.

    full/uniform: chunks of ``recompute_num_layers`` (the last may be shorter), all recomputed;
    full/block: the first ``recompute_num_layers`` blocks one chunk each (recomputed), then one chunk
    with the rest (not recomputed); otherwise: one chunk, not recomputed.
    """
    if granularity != "full" or num_layers == 0:
        return [(0, num_layers, False)] if num_layers else []
    n = recompute_num_layers
    if method == "uniform":
        return [(i, min(i + n, num_layers), True) for i in range(0, num_layers, n)]
    if method == "block":
        first = min(n, num_layers)
        chunks = [(i, i + 1, True) for i in range(first)]
        return chunks + ([(first, num_layers, False)] if first < num_layers else [])
    raise ValueError(f"recompute_method must be 'uniform' or 'block', got {method!r}")


def _run(layers: Sequence[Callable], hidden: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        hidden = layer(hidden)
    return hidden


def run_layers(layers: Sequence[Callable], hidden: torch.Tensor, granularity, method, recompute_num_layers):
    """hidden -> layers[-1](...layers[0](hidden)), recomputing as :func:`full_recompute_chunks` says
    (only while autograd records; under no_grad nothing is recomputed)."""
    record = torch.is_grad_enabled()
    for start, stop, recompute in full_recompute_chunks(len(layers), granularity, method, recompute_num_layers):
        chunk = list(layers[start:stop])
        if recompute and record:
            hidden = checkpoint(functools.partial(_run, chunk), hidden, use_reentrant=False)
        else:
            hidden = _run(chunk, hidden)
    return hidden


def checkpointed(fn: Callable, *args):
    """``fn(*args)``, recomputed in backward when autograd records (selective recomputation)."""
    if torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class _RecomputedLayer(torch.nn.Module):
    """Stands in for a pipeline stage's layer in ``forward_funcs``: the same layer, recomputed in backward."""

    def __init__(self, layer):
        super().__init__()
        self.layer = [layer]  # a list: not registered as a submodule (the stage already owns it)

    def forward(self, hidden):
        return checkpointed(self.layer[0], hidden)


def apply_block_recompute_to_pipeline(pipeline_module, block_classes: Tuple[type, ...], recompute_num_layers: int):
    """full/block for a DeepSpeed PipelineModule: the first ``recompute_num_layers`` blocks of this stage are
    recomputed in backward (their entries in ``forward_funcs`` are wrapped; parameters unchanged)."""
    wrapped = 0
    for i, func in enumerate(pipeline_module.forward_funcs):
        if wrapped == recompute_num_layers:
            break
        if isinstance(func, block_classes):
            pipeline_module.forward_funcs[i] = _RecomputedLayer(func).forward
            wrapped += 1
    return wrapped
