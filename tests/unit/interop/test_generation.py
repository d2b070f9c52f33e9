"""interop/generation.py: the KV-cache step equals recomputing the prefix (both model types, in one
process and at every step of a greedy run at TP 1 and 2), and the sampling rules (temperature, top-k,
top-p) against a direct computation."""

import dataclasses

import pytest
import torch

from megatron_tokenformer.config import TokenformerConfig
from megatron_tokenformer.interop.generation import (
    GenerationError,
    SamplingOptions,
    _choose,
    forward_step,
    generate_tokens,
)
from megatron_tokenformer.model import KVCache, TokenformerLM
from tests.helpers import dist_pool


def tiny(model_type):
    cfg = TokenformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=40, vocab_size=90,
                            qkv_num_param_tokens=16, proj_num_param_tokens=16, ffn_num_param_tokens=32,
                            model_type=model_type, init_method_std=0.3, value_init=0.3,
                            block_layernorm="parametric" if model_type == "transformer" else "nonparametric")
    return TokenformerLM(cfg, seed=11).eval()


@pytest.mark.parametrize("model_type", ["tokenformer", "transformer"])
def test_cached_logits_equal_full_recompute(model_type):
    model = tiny(model_type)
    ids = torch.randint(0, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)[..., :90].float()
    cache = KVCache.empty(len(model.layers))
    parts = [forward_step(model, ids[:, :5], cache), forward_step(model, ids[:, 5:6], cache),
             forward_step(model, ids[:, 6:], cache)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["tokenformer", "transformer"])
def test_greedy_with_cache_equals_without(model_type):
    model = tiny(model_type)
    a = generate_tokens(model, [5, 6, 7], SamplingOptions(max_new_tokens=15, greedy=True, use_cache=True))
    b = generate_tokens(model, [5, 6, 7], SamplingOptions(max_new_tokens=15, greedy=True, use_cache=False))
    assert a == b and len(a) == 15 and len(set(a)) > 2
    # the reference: argmax of the full model's last logits, one token at a time
    ids = [5, 6, 7]
    for _ in range(15):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids]))[0, -1, :90].argmax()))
    assert ids[3:] == a


def check_cached_steps_equal_recompute(rank, world, model_type):
    """A greedy run of 8 steps over a cache (prompt of 4, then one token a step, one step of 2): the
    logits of each step's new positions equal the no-cache forward of the whole prefix at those positions."""
    model = tiny(model_type)
    cache = KVCache.empty(len(model.layers))
    ids = torch.tensor([[5, 17, 3, 60]])
    new = ids
    steps = []
    for step in range(8):
        cached = forward_step(model, new, cache)
        full = forward_step(model, ids, None)
        torch.testing.assert_close(cached, full[:, -new.shape[1]:], rtol=1e-5, atol=1e-5)
        assert cache.length(0) == cache.length(1) == ids.shape[1]
        token = full[:, -1].argmax(-1, keepdim=True)
        new = torch.cat([token, (token + 1) % 90], dim=1) if step == 4 else token
        ids = torch.cat([ids, new], dim=1)
        steps.append(cached[:, -1])
    return torch.cat(steps)


gen_pool = dist_pool.pool_fixture(1, 2)


@pytest.mark.parametrize("model_type", ["tokenformer", "transformer"])
def test_cache_equals_recompute_at_every_step(gen_pool, model_type):
    results = gen_pool.run(check_cached_steps_equal_recompute, model_type)
    for other in results[1:]:  # every TP rank sees the full-vocabulary logits
        torch.testing.assert_close(other, results[0], rtol=0, atol=0)
    if len(results) > 1:  # TP 2 computes the TP 1 function (init is independent of the TP size)
        torch.testing.assert_close(results[0], check_cached_steps_equal_recompute(0, 1, model_type),
                                   rtol=1e-5, atol=1e-5)


def check_sequence_parallel_checkpoint(rank, world, load_dir):
    """A checkpoint whose config says sequence_parallel (a run trained with it) generates at any TP."""
    from megatron_tokenformer.interop.generation import load_model_for_inference
    model, config, _ = load_model_for_inference(load_dir)
    assert not config.sequence_parallel
    tokens = generate_tokens(model, [5, 6, 7, 8], SamplingOptions(max_new_tokens=6, greedy=True))
    if world > 1:  # the model itself refuses a cache with sequence parallelism on (one clear line)
        sp_model = TokenformerLM(dataclasses.replace(model.config, sequence_parallel=True), seed=11).eval()
        with pytest.raises(ValueError, match="needs sequence_parallel off"):
            forward_step(sp_model, torch.tensor([[5]]), KVCache.empty(2))
    return tokens


def test_sequence_parallel_checkpoint_generates_at_any_tp(gen_pool, tmp_path_factory):
    from megatron_tokenformer.interop.checkpoint_format import write_checkpoint
    model = tiny("tokenformer")
    save = str(tmp_path_factory.mktemp("sp_ckpt") / "ckpt")
    config = dataclasses.replace(model.config, sequence_parallel=True)
    tensors = {n: p.detach() for n, p in model.named_parameters()}
    tensors["embedding.word_embeddings.weight"] = tensors["embedding.word_embeddings.weight"][:90]  # no padding
    write_checkpoint(save, config, tensors, {})
    results = gen_pool.run(check_sequence_parallel_checkpoint, save)
    ids = [5, 6, 7, 8]  # the reference: argmax of the full model's last logits, one token at a time
    for _ in range(6):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids]))[0, -1, :90].argmax()))
    assert results == [ids[4:]] * len(results)


def test_stops_at_eod_and_position_limit():
    model = tiny("tokenformer")
    first = generate_tokens(model, [1, 2], SamplingOptions(max_new_tokens=12, greedy=True))
    j = first.index(next(t for t in first if t != first[0]))  # the first token the run has not produced before
    assert generate_tokens(model, [1, 2], SamplingOptions(max_new_tokens=12, greedy=True), eod=first[j]) == first[:j]
    assert len(generate_tokens(model, list(range(35)), SamplingOptions(max_new_tokens=50, greedy=True))) == 5


def test_sampling_rules():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    seen = set()
    for seed in range(200):
        seen.add(int(_choose(logits, SamplingOptions(top_k=2), torch.Generator().manual_seed(seed))))
    assert seen == {0, 1}
    p = torch.softmax(logits, -1)[0]
    top_p = float(p[0] + p[1] / 2)  # needs tokens 0 and 1, not 2
    seen = {int(_choose(logits, SamplingOptions(top_p=top_p), torch.Generator().manual_seed(s))) for s in range(200)}
    assert seen == {0, 1}
    counts = torch.zeros(5)
    for seed in range(3000):
        counts[_choose(logits, SamplingOptions(temperature=0.5), torch.Generator().manual_seed(seed))] += 1
    torch.testing.assert_close(counts / counts.sum(), torch.softmax(logits / 0.5, -1)[0], atol=0.03, rtol=0)
    same = [int(_choose(logits, SamplingOptions(), torch.Generator().manual_seed(7))) for _ in range(3)]
    assert len(set(same)) == 1


@pytest.mark.parametrize("opts, flag", [(dict(max_new_tokens=0), "--max-new-tokens"),
                                        (dict(temperature=0), "--temperature"),
                                        (dict(top_k=-1), "--top-k"), (dict(top_p=1.5), "--top-p")])
def test_bad_options_name_the_flag(opts, flag):
    with pytest.raises(GenerationError, match=flag):
        SamplingOptions(**opts).check()
