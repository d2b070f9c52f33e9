"""Communication accounting: the collectives one block issues at TP = 2, forward and backward.

The expected tables are written here from docs/design.md §3 (T tokens, d hidden, p ranks); the measured
ones come from ``count_collectives``. The same count for a Megatron-style linear block (column/row
parallel linear layers, same d) is measured for comparison. docs/tensor_parallel.md shows these
tables.
"""

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from megatron_tokenformer.config import TokenformerConfig
from megatron_tokenformer.model.block import TokenformerBlock
from megatron_tokenformer.model.language_model import prepare_config
from megatron_tokenformer.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron_tokenformer.tensor_parallel.mappings import count_collectives
from tests.helpers import dist_pool

B, S, D, HEADS = 2, 16, 32, 4
T = B * S


def expected_tokenformer(p, normalization):
    """(forward list in order, backward multiset) of (kind, elements handed to the collective on a rank).

    Forward: Q/K/V norm statistics for the three Pattentions in one all-reduce (3T; softmax: a max
    all-reduce and a sum all-reduce); Q/K/V partial sums [T, 3d] reduce-scattered into the rank's heads
    (3Td in); attention output all-gathered (Td/p in); output Pattention: norm (T) then output all-reduce
    (Td); FFN Pattention: norm (T) then output all-reduce (Td).
    Backward: each norm all-reduce's backward is an all-reduce of the same size; the reduce-scatter's is
    an all-gather (3Td/p); the all-gather's is a reduce-scatter (Td: the output Pattention's input
    gradient is a partial sum); the two replicated-input copies (attention input, FFN input) all-reduce
    their input gradients (Td each); the output all-reduces' backward is the identity.
    """
    def norm_stats(n):
        if normalization == "softmax":
            return [("all_reduce_max", n), ("all_reduce", n)]
        return [("all_reduce", n)]

    forward = (norm_stats(3 * T) + [("reduce_scatter", 3 * T * D), ("all_gather", T * D // p)]
               + norm_stats(T) + [("all_reduce", T * D)] + norm_stats(T) + [("all_reduce", T * D)])
    backward = Counter({("all_reduce", 3 * T): 1, ("all_reduce", T): 2, ("all_reduce", T * D): 2,
                        ("all_gather", 3 * T * D // p): 1, ("reduce_scatter", T * D): 1})
    return forward, backward


def expected_megatron():
    """Megatron's linear block: forward all-reduces after the attention and MLP row-parallel layers;
    backward all-reduces of the two column-parallel layers' input gradients."""
    return [("all_reduce", T * D)] * 2, Counter({("all_reduce", T * D): 2})


class MegatronStyleBlock(torch.nn.Module):
    """Pre-norm linear transformer block with Megatron's TP layout (for the comparison only)."""

    def __init__(self, p):
        super().__init__()
        self.local_heads = HEADS // p
        self.qkv = ColumnParallelLinear(D, 3 * D, tag="qkv")
        self.proj = RowParallelLinear(D, D, tag="proj")
        self.fc1 = ColumnParallelLinear(D, 4 * D, tag="fc1")
        self.fc2 = RowParallelLinear(4 * D, D, tag="fc2")

    def forward(self, x):
        q, k, v = (t.reshape(B, S, self.local_heads, -1).transpose(1, 2)
                   for t in self.qkv(F.layer_norm(x, (D,))).chunk(3, dim=-1))
        ctx = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, S, -1)
        x = x + self.proj(ctx)
        return x + self.fc2(F.gelu(self.fc1(F.layer_norm(x, (D,)))))


def measure(block, x):
    with count_collectives() as forward:
        out = block(x)
    with count_collectives() as backward:
        out.sum().backward()
    return forward, Counter(backward)


def check_tokenformer_block(rank, world, normalization):
    x = torch.randn(B, S, D, generator=torch.Generator().manual_seed(0), requires_grad=True)
    cfg = prepare_config(TokenformerConfig(
        num_layers=1, hidden_size=D, num_attention_heads=HEADS, seq_length=S, vocab_size=64,
        qkv_num_param_tokens=8, proj_num_param_tokens=8, ffn_num_param_tokens=16,
        pattention_normalization=normalization))
    forward, backward = measure(TokenformerBlock(cfg, 1), x)
    exp_forward, exp_backward = expected_tokenformer(world, normalization)
    assert forward == exp_forward, (normalization, forward)
    assert backward == exp_backward, (normalization, backward)


def check_megatron_block(rank, world):
    x = torch.randn(B, S, D, generator=torch.Generator().manual_seed(0), requires_grad=True)
    forward, backward = measure(MegatronStyleBlock(world), x)
    assert (forward, backward) == expected_megatron(), (forward, backward)


tp_pool = dist_pool.pool_fixture(2)


@pytest.mark.parametrize("normalization", ["l2_norm_gelu", "softmax"])
def test_tokenformer_block_collectives(tp_pool, normalization):
    tp_pool.run(check_tokenformer_block, normalization)


def test_megatron_style_block_collectives(tp_pool):
    tp_pool.run(check_megatron_block)
