"""Whether a model built now runs sequence parallel (docs/design.md, "Sequence parallelism").

With ``config.sequence_parallel`` and TP = p > 1, the residual stream between sublayers, the block
LayerNorms and the final LayerNorm hold [b, s/p, d] per TP rank: the embedding reduce-scatters along
the sequence, every tensor-parallel layer that would copy its input all-gathers the sequence instead
(backward: reduce-scatter), every one that would all-reduce its output reduce-scatters along the
sequence instead (backward: all-gather), the logits all-gather the sequence before the vocabulary-
parallel loss, and the pipeline sends [b, s/p, d] between stages. Replicated parameters used on the
local rows only (parametric LayerNorms, the baseline's row-parallel biases) get their gradients
all-reduced over the TP group. At TP = 1 the flag has no effect (as in Megatron).
"""

from __future__ import annotations

from megatron_tokenformer import parallel_state


def sequence_parallel_enabled(config) -> bool:
    return bool(getattr(config, "sequence_parallel", False)) and \
        parallel_state.get_tensor_model_parallel_world_size() > 1
