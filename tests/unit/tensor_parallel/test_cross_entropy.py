"""tensor_parallel/cross_entropy.py: vocab-parallel cross-entropy against torch.nn.functional.cross_entropy.

The full logits [b, s, V] (V = 51 true entries, padded to 52 with -inf, as parallel_lm_logits leaves
them) are generated identically on every rank; rank r feeds its block of the vocabulary. The
reference is F.cross_entropy in float64 over the 51 true entries, differentiated with autograd;
the padding entries must get exactly zero gradient. At TP = 1 the check runs in the test process.
"""

import pytest
import torch
import torch.nn.functional as F

from megatron_tokenformer.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from tests.helpers import dist_pool

VOCAB, PADDED = 51, 52
RTOL, ATOL = 1e-5, 1e-6


def full_logits(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 7, PADDED, generator=g) * 4.0
    logits[..., VOCAB:] = float("-inf")
    targets = torch.randint(0, VOCAB, (3, 7), generator=g)
    # targets at every block boundary of TP 2 and 4 (blocks of 26 and 13) and the last true id
    targets[0, :6] = torch.tensor([0, 12, 13, 25, 26, VOCAB - 1])
    weights = torch.rand(3, 7, generator=g)
    return logits, targets, weights


def reference(logits, targets, weights):
    """float64 per-token losses and the gradient of sum(weights * losses) w.r.t. all PADDED logits."""
    true = logits[..., :VOCAB].double().requires_grad_()
    losses = F.cross_entropy(true.reshape(-1, VOCAB), targets.reshape(-1), reduction="none").view(targets.shape)
    (losses * weights.double()).sum().backward()
    grad = torch.cat([true.grad, torch.zeros(targets.shape + (PADDED - VOCAB,), dtype=torch.float64)], dim=-1)
    return losses.detach(), grad


def check_matches_torch(rank, world, dtype_name):
    dtype = getattr(torch, dtype_name)
    logits, targets, weights = full_logits()
    logits = logits.to(dtype)
    ref_losses, ref_grad = reference(logits, targets, weights)
    local = logits.chunk(world, dim=-1)[rank].clone().requires_grad_()
    losses = vocab_parallel_cross_entropy(local, targets)
    assert losses.dtype == torch.float32 and losses.shape == targets.shape
    (losses * weights).sum().backward()
    assert local.grad.dtype == dtype
    torch.testing.assert_close(losses.double(), ref_losses, rtol=RTOL, atol=ATOL)
    tol = dict(rtol=RTOL, atol=ATOL) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(local.grad.double(), ref_grad.chunk(world, dim=-1)[rank], **tol)
    padding = torch.arange(rank * PADDED // world, (rank + 1) * PADDED // world) >= VOCAB
    assert torch.equal(local.grad[..., padding], torch.zeros_like(local.grad[..., padding]))
    return losses.detach()


def check_extreme_logits(rank, world):
    """Huge logits do not overflow (the max shift is global: a rank whose block holds only small
    logits still agrees with the others)."""
    logits, targets, _ = full_logits(seed=1)
    logits[0, 0, 3] = 1.0e4  # in rank 0's block at every TP size
    logits[1, 1, VOCAB - 1] = -1.0e4
    ref_losses, _ = reference(logits, targets, torch.ones(targets.shape))
    losses = vocab_parallel_cross_entropy(logits.chunk(world, dim=-1)[rank], targets)
    assert torch.isfinite(losses).all()
    torch.testing.assert_close(losses.double(), ref_losses, rtol=RTOL, atol=ATOL)


tp_pool = dist_pool.pool_fixture(1, 2, 4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_losses_and_gradients_match_torch(tp_pool, dtype):
    per_rank = tp_pool.run(check_matches_torch, dtype)
    assert all(torch.equal(losses, per_rank[0]) for losses in per_rank), "ranks disagree on the loss"


def test_extreme_logits(tp_pool):
    tp_pool.run(check_extreme_logits)
