"""model/rotary.py against the closed-form complex rotation (tests/helpers/plain_reference.rotary)."""

import math

import pytest
import torch

from megatron_tokenformer.config import TokenformerConfig
from megatron_tokenformer.model.rotary import RotaryEmbedding, apply_rotary_pos_emb
from tests.helpers import plain_reference

HEAD_DIM = 16
ROTARY_DIM = 4  # fraction 0.25 of the head


def heads(s=9, seed=0, dtype=torch.float32):
    return torch.randn(2, s, 3, HEAD_DIM, generator=torch.Generator().manual_seed(seed)).to(dtype)


def rotate(x, rotary_dim=ROTARY_DIM, base=10000.0):
    cos, sin = RotaryEmbedding(rotary_dim, base)(x.shape[1])
    return apply_rotary_pos_emb(x, cos, sin)


def test_fraction_of_head():
    cfg = TokenformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, seq_length=8, vocab_size=10,
                            qkv_num_param_tokens=2, proj_num_param_tokens=2, ffn_num_param_tokens=2)
    assert cfg.rotary_percent == 0.25 and cfg.rotary_dim == ROTARY_DIM


def test_tables_are_cos_and_sin_of_position_times_frequency():
    cos, sin = RotaryEmbedding(ROTARY_DIM, 500.0)(7)
    assert cos.shape == sin.shape == (7, ROTARY_DIM) and cos.dtype == torch.float32
    for pos in range(7):
        for j in range(ROTARY_DIM // 2):
            angle = pos * 500.0 ** (-2 * j / ROTARY_DIM)
            for col in (j, j + ROTARY_DIM // 2):
                assert abs(cos[pos, col].item() - math.cos(angle)) < 1e-6
                assert abs(sin[pos, col].item() - math.sin(angle)) < 1e-6


@pytest.mark.parametrize("rotary_dim", [2, ROTARY_DIM, HEAD_DIM])
def test_rotation_matches_closed_form(rotary_dim):
    x = heads()
    got = rotate(x, rotary_dim)
    want = plain_reference.rotary(x.double(), rotary_dim)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert torch.equal(got[..., rotary_dim:], x[..., rotary_dim:]), "channels past rotary_dim are untouched"


def test_position_zero_is_identity_and_norms_are_kept():
    x = heads()
    got = rotate(x)
    torch.testing.assert_close(got[:, 0], x[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(got.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-6)


def test_scores_depend_on_relative_position_only():
    q, k = heads(seed=1)[:, :1], heads(seed=2)[:, :1]  # one query and one key vector per head
    s = 12
    rq, rk = rotate(q.expand(2, s, 3, HEAD_DIM)), rotate(k.expand(2, s, 3, HEAD_DIM))
    score = torch.einsum("bqhc,bkhc->bhqk", rq, rk)  # score[m, n] for q at position m, k at n
    for offset in range(-3, 4):
        diagonal = torch.diagonal(score, offset=offset, dim1=-2, dim2=-1)
        torch.testing.assert_close(diagonal, diagonal[..., :1].expand_as(diagonal), rtol=1e-4, atol=1e-4)


def test_low_precision_input_keeps_its_dtype():
    x = heads(dtype=torch.bfloat16)
    got = rotate(x)
    assert got.dtype == torch.bfloat16
    want = plain_reference.rotary(x.double(), ROTARY_DIM)
    torch.testing.assert_close(got.double(), want, rtol=8e-3, atol=1e-2)  # about two bf16 ulps
    assert torch.equal(got[..., ROTARY_DIM:], x[..., ROTARY_DIM:])


def test_tables_follow_the_sequence_length():
    emb = RotaryEmbedding(ROTARY_DIM)
    short, _ = emb(5)
    long, _ = emb(9)
    again, _ = emb(5)
    assert short.shape[0] == 5 and long.shape[0] == 9 and torch.equal(again, short)
    assert torch.equal(long[:5], short), "a position's angle does not depend on the sequence length"


def test_zero_and_odd_rotary_dim():
    x = heads()
    cos, sin = RotaryEmbedding(0)(x.shape[1])
    assert torch.equal(apply_rotary_pos_emb(x, cos, sin), x)
    with pytest.raises(ValueError, match="rotary_dim must be even, got 3"):
        RotaryEmbedding(3)
