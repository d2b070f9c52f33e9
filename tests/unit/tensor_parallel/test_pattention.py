"""tensor_parallel/pattention.py: ParallelPattention against the Pattention formula, at TP 1, 2 and 4.

Each rank gathers the full key/value parameter tokens (tests/helpers/tp_gather.py) and runs the plain
float64 formula (tests/helpers/plain_reference.pattention); the gathered tokens must be exactly the
TP = 1 layer's (built in the test process: initialisation does not depend on the layout). Partial
outputs (``reduce_output=False``) and partial input gradients (``copy_input=False``) are summed over
the ranks with torch.distributed directly before the comparison. The collective counter checks that
several layers' statistics travel in one all-reduce.
"""

import math

import pytest
import torch
import torch.distributed as dist

from megatron_tokenformer import parallel_state
from megatron_tokenformer.tensor_parallel import mappings
from megatron_tokenformer.tensor_parallel.pattention import (
    ParallelPattention,
    normalize_parallel_pattention_scores,
    parallel_pattention_partial_outputs,
)
from tests.helpers import dist_pool, plain_reference
from tests.helpers.tp_gather import full_parameters, shard

NORMS = ("l2_norm_gelu", "gelu_l2_norm", "softmax")
TOL = dict(rtol=1e-5, atol=1e-5)


def layer(normalization, n=16, **kw):
    return ParallelPattention(12, 10, n, normalization=normalization, key_init_std=0.4, value_init_std=0.5,
                              seed=3, layer_number=2, tag="p", **kw)


def inputs():
    gen = torch.Generator().manual_seed(9)
    x, g = torch.randn(2, 5, 12, generator=gen), torch.randn(2, 5, 10, generator=gen)
    x[0, 0] = 0.0  # an all-zero row: finite outputs and gradients (the norms' eps), as the formula
    return x, g


def sum_over_ranks(t, world):
    if world > 1:
        t = t.clone()
        dist.all_reduce(t, group=parallel_state.get_tensor_model_parallel_group())
    return t


def check_matches_formula(rank, world, normalization, partial):
    kw = dict(copy_input=False, reduce_output=False) if partial else {}
    pat = layer(normalization, **kw)
    assert pat.key_param_tokens.shape == (16 // world, 12) and pat.value_param_tokens.shape == (16 // world, 10)
    assert pat.tau == math.sqrt(16), "tau defaults to sqrt of the GLOBAL token count"
    full = {n: t.double().requires_grad_() for n, t in full_parameters(pat, world).items()}
    x, g = inputs()
    xr, xp = x.double().requires_grad_(), x.clone().requires_grad_()
    want = plain_reference.pattention(xr, full["key_param_tokens"], full["value_param_tokens"], normalization,
                                      math.sqrt(16), 1e-6)
    want.backward(g.double())
    out = pat(xp)
    out.backward(g)
    got_out, got_dx = (sum_over_ranks(out.detach(), world), sum_over_ranks(xp.grad, world)) if partial \
        else (out, xp.grad)
    torch.testing.assert_close(got_out.double(), want.detach(), **TOL)
    torch.testing.assert_close(got_dx.double(), xr.grad, **TOL)
    for name, p in pat.named_parameters():
        torch.testing.assert_close(p.grad.double(), shard(full[name].grad, p, rank, world), **TOL,
                                   msg=lambda m, name=name: f"{name}: {m}")
    return {name: t.detach().float() for name, t in full.items()}


def check_batched_statistics(rank, world, normalization):
    layers = [layer(normalization, n=8 * (i + 1)) for i in range(3)]
    x, _ = inputs()
    with mappings.count_collectives() as log:
        partials = parallel_pattention_partial_outputs(layers, x)
    rows = x.numel() // x.shape[-1]
    stats = [("all_reduce_max", 3 * rows)] if normalization == "softmax" else []
    assert log == stats + [("all_reduce", 3 * rows)], log
    for pat, partial in zip(layers, partials):  # the same partial sums as each layer alone
        pat.reduce_output = False
        torch.testing.assert_close(partial, pat(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="batched Pattention normalisation needs one normalization and eps"):
        normalize_parallel_pattention_scores([layer("softmax"), layer("l2_norm_gelu")], [x[..., :8], x[..., :8]])


def check_errors(rank, world):
    with pytest.raises(ValueError, match="unknown Pattention normalization 'relu'"):
        layer("relu")
    if world > 1:
        with pytest.raises(ValueError, match=rf"p: num_param_tokens \({world + 1}\) is not divisible by the "
                                             rf"tensor-model-parallel size \({world}\)"):
            layer("softmax", n=world + 1)
    assert "num_param_tokens=16 (%d per rank)" % (16 // world) in repr(layer("softmax"))


tp_pool = dist_pool.pool_fixture(1, 2, 4)


@pytest.mark.parametrize("normalization", NORMS)
@pytest.mark.parametrize("partial", [False, True], ids=["full", "partial-in-and-out"])
def test_matches_pattention_formula(tp_pool, normalization, partial):
    gathered = tp_pool.run(check_matches_formula, normalization, partial)
    tp1 = layer(normalization)  # this process has no group: the TP = 1 layer
    for rank, full in enumerate(gathered):
        for name, p in tp1.named_parameters():
            assert torch.equal(full[name], p.detach()), f"rank {rank}: {name} is not the TP = 1 init"


@pytest.mark.parametrize("normalization", ["l2_norm_gelu", "softmax"])
def test_several_layers_share_one_statistics_collective(tp_pool, normalization):
    tp_pool.run(check_batched_statistics, normalization)


def test_bad_arguments(tp_pool):
    tp_pool.run(check_errors)
