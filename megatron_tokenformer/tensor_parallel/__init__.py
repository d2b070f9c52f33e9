"""Tensor parallelism: communication mappings, RNG, parallel Pattention, vocab-parallel layers and loss."""

from megatron_tokenformer.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_tokenformer.tensor_parallel.layers import (
                                                         ColumnParallelLinear,
                                                         RowParallelLinear,
                                                         VocabParallelEmbedding,
                                                         parallel_lm_logits,
)
from megatron_tokenformer.tensor_parallel.mappings import (
                                                         all_reduce_max_no_grad,
                                                         all_reduce_norm,
                                                         copy_to_tensor_model_parallel_region,
                                                         count_collectives,
                                                         gather_from_tensor_model_parallel_region,
                                                         reduce_from_tensor_model_parallel_region,
                                                         reduce_scatter_to_tensor_model_parallel_region,
                                                         scatter_to_tensor_model_parallel_region,
)
from megatron_tokenformer.tensor_parallel.pattention import (
                                                         ParallelPattention,
                                                         normalize_parallel_pattention_scores,
                                                         parallel_pattention_partial_outputs,
)
from megatron_tokenformer.tensor_parallel.random import (
                                                         get_cuda_rng_tracker,
                                                         get_rng_tracker,
                                                         init_partitioned_,
                                                         model_parallel_cuda_manual_seed,
                                                         model_parallel_seed,
)
from megatron_tokenformer.tensor_parallel.utils import VocabUtility, divide

__all__ = [
    "vocab_parallel_cross_entropy", "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding",
    "parallel_lm_logits", "all_reduce_max_no_grad", "all_reduce_norm", "copy_to_tensor_model_parallel_region",
    "count_collectives", "gather_from_tensor_model_parallel_region", "reduce_from_tensor_model_parallel_region",
    "reduce_scatter_to_tensor_model_parallel_region", "scatter_to_tensor_model_parallel_region",
    "ParallelPattention", "normalize_parallel_pattention_scores", "parallel_pattention_partial_outputs",
    "get_cuda_rng_tracker", "get_rng_tracker", "init_partitioned_", "model_parallel_cuda_manual_seed",
    "model_parallel_seed", "VocabUtility", "divide",
]
