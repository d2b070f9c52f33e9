"""Cross-entropy over vocab-parallel logits (each TP rank holds a contiguous block of the vocabulary).

Two collectives forward: a max all-reduce (the stabilising shift) and ONE sum all-reduce carrying both
the target logit and the partition function. Backward is local: softmax minus one-hot on the rank's
own block.

Memory (as Megatron-LM's): ONE fp32 tensor of the logits' shape [..., V/p] is made -- the upcast
(or, for fp32 logits, the shifted copy) -- and then worked on in place: shifted, exponentiated,
normalised into the softmax that is saved for backward; backward turns that saved softmax into the
gradient in place (so the graph cannot be back-propagated twice, ``retain_graph`` included).
"""

from __future__ import annotations

import torch

from megatron_tokenformer import parallel_state
from megatron_tokenformer.tensor_parallel.mappings import _collective
from megatron_tokenformer.tensor_parallel.utils import check_token_ids


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target):
        local = logits.shape[-1]
        rank = parallel_state.get_tensor_model_parallel_rank()
        start = rank * local
        logits_max = _collective("all_reduce_max", logits.amax(dim=-1).float())
        if logits.dtype == torch.float32:
            work = logits - logits_max.unsqueeze(-1)  # the input itself is never modified
        else:
            work = logits.float()  # the one fp32 copy
            work.sub_(logits_max.unsqueeze(-1))

        outside = (target < start) | (target >= start + local)
        local_target = (target - start).masked_fill(outside, 0)
        predicted = torch.gather(work, -1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        torch.exp(work, out=work)
        sums = _collective("all_reduce", torch.stack([predicted, work.sum(dim=-1)]))
        predicted, sum_exp = sums[0], sums[1]
        loss = torch.log(sum_exp) - predicted

        work.div_(sum_exp.unsqueeze(-1))  # softmax
        ctx.save_for_backward(work, outside, local_target)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad, outside, local_target = ctx.saved_tensors  # the softmax, turned into the gradient in place
        hit = (~outside).to(grad.dtype)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -hit.unsqueeze(-1))
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad, None


def vocab_parallel_cross_entropy(vocab_parallel_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token loss, fp32.

    vocab_parallel_logits: [..., V/p] (this rank's vocabulary block, any float dtype; -inf allowed
    for padding entries). target: [...] long, global ids in [0, V) (else refused: utils.check_token_ids).
    Returns [...] fp32, identical on all TP ranks.
    The gradient w.r.t. the logits is fp32 (autograd casts it back to the logits' dtype).
    """
    # a target no rank owns would give a loss without its target logit (TP > 1): refused
    check_token_ids(target, vocab_parallel_logits.shape[-1] * parallel_state.get_tensor_model_parallel_world_size(),
                    "the cross-entropy target")
    return _VocabParallelCrossEntropy.apply(vocab_parallel_logits, target)
