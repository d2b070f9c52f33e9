"""Vocabulary-parallel cross-entropy (tensor_parallel/cross_entropy.py) against
torch.nn.functional.cross_entropy on the full, unpadded vocabulary: values and gradients at TP 1 and
TP 2 (padded vocabulary: -inf logits past the real vocabulary), fp32 and bf16 logits; and its memory:
one fp32 copy of the logits in forward, none in backward, no more saved bytes than the previous version.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_tokenformer import parallel_state
from megatron_tokenformer.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_tokenformer.tensor_parallel.mappings import _collective
from megatron_tokenformer.testing import spawn_gloo

VOCAB, PADDED = 37, 40  # padded to a multiple of TP = 2 x 4


def _case(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(2, 5, VOCAB, generator=g)).to(dtype)
    target = torch.randint(0, VOCAB, (2, 5), generator=g)
    target[0, 0], target[1, 4] = 0, VOCAB - 1  # both ends of the vocabulary
    padded = torch.cat([logits, torch.full((2, 5, PADDED - VOCAB), float("-inf"), dtype=dtype)], dim=-1)
    weights = torch.rand(2, 5, generator=g)  # a non-uniform upstream gradient
    return padded, target, weights


def _reference(padded, target, weights):
    """F.cross_entropy in float64 on the real vocabulary; gradient w.r.t. the padded logits."""
    x = padded[..., :VOCAB].double().requires_grad_(True)
    loss = F.cross_entropy(x.reshape(-1, VOCAB), target.reshape(-1), reduction="none").view(target.shape)
    (loss * weights).sum().backward()
    grad = torch.cat([x.grad, torch.zeros(*target.shape, PADDED - VOCAB, dtype=torch.float64)], dim=-1)
    return loss.detach(), grad


def _check(local_logits, target, weights, ref_loss, ref_grad_block, tol):
    x = local_logits.clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(x, target)
    assert loss.dtype == torch.float32
    (loss * weights).sum().backward()
    assert x.grad.dtype == x.dtype
    torch.testing.assert_close(loss.double(), ref_loss, rtol=tol, atol=tol)
    torch.testing.assert_close(x.grad.double(), ref_grad_block, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_tp1_matches_torch(dtype, tol):
    padded, target, weights = _case(dtype)
    ref_loss, ref_grad = _reference(padded, target, weights)
    _check(padded, target, weights, ref_loss, ref_grad, tol)


def _tp2_worker(rank, world):
    parallel_state.initialize_model_parallel(2, 1)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        padded, target, weights = _case(dtype, seed=3)
        ref_loss, ref_grad = _reference(padded, target, weights)
        block = PADDED // world
        sl = slice(rank * block, (rank + 1) * block)  # rank 1 holds the padding
        _check(padded[..., sl], target, weights, ref_loss, ref_grad[..., sl], tol)


@pytest.mark.slow
def test_tp2_matches_torch():
    spawn_gloo(_tp2_worker, 2)


# --------------------------------------------------------------------------- memory


class _PreviousCrossEntropy(torch.autograd.Function):
    """The implementation before the in-place rewrite (upcast, shifted copy, exp copy; clone in backward),
    kept here as the memory baseline."""

    @staticmethod
    def forward(ctx, logits, target):
        logits = logits.float()
        local = logits.shape[-1]
        start = parallel_state.get_tensor_model_parallel_rank() * local
        logits_max = _collective("all_reduce_max", logits.amax(dim=-1))
        shifted = logits - logits_max.unsqueeze(-1)
        outside = (target < start) | (target >= start + local)
        local_target = (target - start).masked_fill(outside, 0)
        predicted = torch.gather(shifted, -1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        exp = torch.exp(shifted)
        sums = _collective("all_reduce", torch.stack([predicted, exp.sum(dim=-1)]))
        loss = torch.log(sums[1]) - sums[0]
        ctx.save_for_backward(exp.div_(sums[1].unsqueeze(-1)), outside, local_target)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, outside, local_target = ctx.saved_tensors
        grad = softmax.clone()
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -(~outside).to(grad.dtype).unsqueeze(-1))
        return grad.mul_(grad_loss.unsqueeze(-1)), None


class _LogitSizedAllocations(TorchDispatchMode):
    """Counts new fp32 tensors with as many elements as the logits (outputs not aliasing an input)."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        for o in torch.utils._pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor) and o.dtype == torch.float32 and o.numel() == self.numel \
                    and not any(o.untyped_storage().data_ptr() == i.untyped_storage().data_ptr() for i in inputs):
                self.count += 1
        return out


def _memory(fn, dtype):
    padded, target, _ = _case(dtype)
    x = padded.clone().requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with _LogitSizedAllocations(x.numel()) as fwd, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn(x, target)
    with _LogitSizedAllocations(x.numel()) as bwd:
        loss.sum().backward()
    return fwd.count, bwd.count, sum(saved)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_one_fp32_copy_in_forward_none_in_backward(dtype):
    new_fwd, new_bwd, new_saved = _memory(vocab_parallel_cross_entropy, dtype)
    old_fwd, old_bwd, old_saved = _memory(_PreviousCrossEntropy.apply, dtype)
    assert (new_fwd, new_bwd) == (1, 0)
    assert old_fwd == (3 if dtype == torch.bfloat16 else 2) and old_bwd == 1  # the baseline is measured right
    fp32_logits = 2 * 5 * PADDED * 4
    assert fp32_logits <= new_saved <= old_saved  # the saved softmax, the masks; never the input logits too
    assert new_saved < 2 * fp32_logits
