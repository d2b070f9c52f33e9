"""The pipeline layer specs, run in sequence in one process, compute TokenformerLM's loss and gradients."""

import torch
from deepspeed.pipe import LayerSpec, TiedLayerSpec

from megatron_tokenformer.config import TokenformerConfig
from megatron_tokenformer.model import TokenformerLM
from megatron_tokenformer.model.pipeline import get_layer_specs, pipeline_loss_fn


def test_specs_in_sequence_equal_tokenformer_lm():
    cfg = TokenformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=50,
                            qkv_num_param_tokens=8, proj_num_param_tokens=8, ffn_num_param_tokens=16,
                            block_layernorm="parametric")
    specs = get_layer_specs(cfg, seed=5)
    assert len(specs) == cfg.num_layers + 3
    assert isinstance(specs[0], TiedLayerSpec) and isinstance(specs[-1], TiedLayerSpec)
    assert specs[0].key == specs[-1].key and all(isinstance(s, LayerSpec) for s in specs[1:-1])

    # build like PipelineModule does: the tied module once, shared by the first and last layer
    tied = specs[0].build()
    layers = [lambda x, f=specs[0].forward_fn: f(tied, x)]
    layers += [s.build() for s in specs[1:-1]]
    layers.append(lambda x, f=specs[-1].forward_fn: f(tied, x))
    modules = [tied] + [m for m in layers if isinstance(m, torch.nn.Module)]

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (2, 16), generator=g)
    labels = torch.randint(0, 50, (2, 16), generator=g)
    mask = (torch.rand(2, 16, generator=g) > 0.5).float()

    x = (ids,)
    for layer in layers:
        x = layer(x)
    loss = pipeline_loss_fn(x, (labels, mask))
    loss.backward()

    model = TokenformerLM(cfg, seed=5)
    ref = model(ids, labels, mask)
    ref.backward()
    assert torch.equal(loss, ref)

    # same parameters (same init) and gradients, in TokenformerLM's order
    pipe_params = [p for m in modules for p in m.parameters()]
    lm_params = ([model.embedding.word_embeddings.weight] + [p for l in model.layers for p in l.parameters()]
                 + list(model.final_layernorm.parameters()))
    assert len(pipe_params) == len(lm_params) == len(list(model.parameters()))
    for a, b in zip(pipe_params, lm_params):
        assert torch.equal(a, b) and torch.equal(a.grad, b.grad)
    assert torch.equal(pipeline_loss_fn(x.detach(), labels), model(ids, labels))
