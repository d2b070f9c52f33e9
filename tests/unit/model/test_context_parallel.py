"""model/context_parallel.py (causal attention across the context-parallel split) and the context-parallel loss,
against unsplit float64 references, on spawned gloo ranks (CP 2 and 4).

- attention: each rank holds its two chunks of q, k, v (tensor_parallel/context_parallel.split_for_rank); its
  output and the gradients of its q, k, v must be its chunks of the unsplit causal attention's
  (tests/helpers/plain_reference.causal_attention: float64 softmax, closed-form rotary at positions 0..s-1).
- the whole LM (both model families, float64): every rank's loss is the unsplit sequence's loss, and the
  gradients averaged over the CP ranks (what DeepSpeed's DP x CP reduction does) are the unsplit gradients.
"""

import pytest
import torch
import torch.distributed as dist

from megatron_tokenformer import parallel_state
from megatron_tokenformer.config import TokenformerConfig
from megatron_tokenformer.model import TokenformerLM
from megatron_tokenformer.model import context_parallel as cp_attention
from megatron_tokenformer.model.context_parallel import context_parallel_attention
from megatron_tokenformer.model.rotary import RotaryEmbedding
from megatron_tokenformer.model.transformer import transformer_config
from megatron_tokenformer.tensor_parallel.context_parallel import merge_from_ranks, split_for_rank
from tests.helpers import dist_pool, plain_reference

B, S, H, HD = 2, 16, 2, 8


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _check_attention(rank, world, rotary_dim):
    with dist_pool.own_model_parallel_groups():
        parallel_state.initialize_model_parallel(1, 1, world)
        q, k, v, g = (_randn(B, S, H, HD, seed=s) for s in (1, 2, 3, 4))
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        want = plain_reference.causal_attention(*leaves, rotary_dim=rotary_dim).view(B, S, H, HD)
        want.backward(g)
        mine = [split_for_rank(t, world, rank).requires_grad_() for t in (q, k, v)]
        rotary = RotaryEmbedding(rotary_dim) if rotary_dim else None
        out = context_parallel_attention(*mine, rotary)
        out.backward(split_for_rank(g, world, rank))
        # rotary tables are fp32 in the module (as in training): 1e-6; without rotary float64 throughout
        tol = dict(rtol=1e-6, atol=1e-6) if rotary_dim else dict(rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out, split_for_rank(want.detach(), world, rank), **tol)
        for name, got, ref in zip("qkv", mine, leaves):
            torch.testing.assert_close(got.grad, split_for_rank(ref.grad, world, rank), **tol,
                                       msg=lambda m, name=name: f"d{name}: {m}")
        return out.detach()


@pytest.mark.parametrize("rotary_dim", [0, 4], ids=["no-rotary", "rotary"])
def test_attention_matches_unsplit_reference(cp_pool, rotary_dim):
    outs = cp_pool.run(_check_attention, rotary_dim)
    assert merge_from_ranks(outs).shape == (B, S, H, HD)


def _config(family):
    common = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=S, vocab_size=61,
                  make_vocab_size_divisible_by=8, init_method_std=0.2, rotary_percent=0.5)
    if family == "transformer":
        return transformer_config(**common)
    return TokenformerConfig(qkv_num_param_tokens=8, proj_num_param_tokens=12, ffn_num_param_tokens=16,
                             value_init=0.3, **common)


def _check_lm(rank, world, family):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 61, (B, S), generator=g)
    labels = torch.randint(0, 61, (B, S), generator=g)
    mask = (torch.rand(B, S, generator=g) > 0.25).double()
    mask[0, :S // 2] = 0  # one rank's tokens of a sample all masked at CP 2: the count must be global

    with dist_pool.own_model_parallel_groups():
        parallel_state.initialize_model_parallel(1, 1, 1)  # the unsplit reference, in this process
        ref_model = TokenformerLM(_config(family), seed=7).double()
        ref_loss = ref_model(ids, labels, mask)
        ref_loss.backward()
    with dist_pool.own_model_parallel_groups():
        parallel_state.initialize_model_parallel(1, 1, world)
        model = TokenformerLM(_config(family), seed=7).double()
        loss = model(*(split_for_rank(t, world, rank) for t in (ids, labels, mask)))
        loss.backward()
        group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        for (name, p), (_, ref_p) in zip(model.named_parameters(), ref_model.named_parameters()):
            grad = p.grad.clone()
            dist.all_reduce(grad, group=group)  # the gradient reduction: the mean over the DP x CP ranks
            grad /= world
            assert ref_p.grad.abs().max() > 0, name
            # float64 model; the cross-entropy and rotary tables compute in fp32 (per token, as in training)
            torch.testing.assert_close(grad, ref_p.grad, rtol=1e-6, atol=1e-7 * float(ref_p.grad.abs().max()),
                                       msg=lambda m, name=name: f"{name}: {m}")
    assert abs(loss.item() - ref_loss.item()) <= 1e-7 * abs(ref_loss.item())
    return loss.item()


@pytest.mark.parametrize("family", ["tokenformer", "transformer"])
def test_lm_loss_and_reduced_gradients_match_unsplit_run(cp_pool, family):
    losses = cp_pool.run(_check_lm, family)
    assert len(set(losses)) == 1  # the same loss on every context-parallel rank


cp_pool = dist_pool.pool_fixture(2, 4)


# --- the two implementations of chunk attention, one process -------------------------------------------
@pytest.mark.parametrize("impl", ["chunked", "cpu_flash", "sdpa"])
@pytest.mark.parametrize("tile", [None, 40], ids=["one-tile", "tiled"])
def test_chunk_attention_matches_causal_attention_rows(monkeypatch, impl, tile):
    """Query chunks at global positions (0, 12) and (4, 8) of a 16-token sequence (the two chunks CP ranks 0
    and 1 of CP 2 hold) against the rows of the unsplit causal attention; float64, forward and backward.
    ``tile``: score tiles of 40 elements force several query-row tiles per chunk."""
    if tile is not None:
        monkeypatch.setattr(cp_attention, "TILE_ELEMENTS", tile)
    q, k, v, g = (_randn(B, H, S, HD, seed=s) for s in (5, 6, 7, 8))
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    want = plain_reference.causal_attention(*(t.transpose(1, 2) for t in ref)).view(B, S, H, HD).transpose(1, 2)
    want.backward(g)
    fn = {"chunked": cp_attention.chunk_causal_attention, "cpu_flash": cp_attention.cpu_flash_chunk_causal_attention,
          "sdpa": cp_attention.sdpa_lower_right_attention}[impl]
    for starts in ((0, 12), (4, 8)):
        rows = torch.cat([torch.arange(st, st + 4) for st in starts])
        mine = [q[:, :, rows].clone().requires_grad_(), k.clone().requires_grad_(), v.clone().requires_grad_()]
        out = fn(*mine, starts, 4)
        torch.testing.assert_close(out, want.detach()[:, :, rows], rtol=1e-12, atol=1e-12)
        out.backward(g[:, :, rows])
        torch.testing.assert_close(mine[0].grad, ref[0].grad[:, :, rows], rtol=1e-12, atol=1e-12)
        # this rank's queries' share of dK, dV: the reference's restricted to these query rows
        part = [t.clone().requires_grad_() for t in (q, k, v)]
        sub = plain_reference.causal_attention(*(t.transpose(1, 2) for t in part)).view(B, S, H, HD).transpose(1, 2)
        sub[:, :, rows].backward(g[:, :, rows])
        torch.testing.assert_close(mine[1].grad, part[1].grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(mine[2].grad, part[2].grad, rtol=1e-12, atol=1e-12)


def test_attention_implementation_by_device():
    assert cp_attention.attention_implementation("cuda") == "sdpa"
    assert cp_attention.attention_implementation("cpu") == "cpu_flash"
    assert cp_attention.attention_implementation("xpu") == "chunked"
    assert cp_attention._row_tiles(4, 12, 1) == [(0, 4)]
    monkey = cp_attention.TILE_ELEMENTS
    try:
        cp_attention.TILE_ELEMENTS = 40  # 40 // (2 x 16 keys) = 1 row per tile
        assert cp_attention._row_tiles(4, 12, 2) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    finally:
        cp_attention.TILE_ELEMENTS = monkey
