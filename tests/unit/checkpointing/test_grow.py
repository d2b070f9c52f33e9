"""Token growth (checkpointing/grow.py) with the initialisation options of issue 11 (--value-init-std,
--qkv-tau/--proj-tau/--ffn-tau), in one process: the grown model computes the source model's logits
(<= 1e-5) and keeps the source's tau; the defaults give today's model bit for bit.

The growth is the real plan_growth + GrownView.read on an in-memory view of the source model's tensors;
the references are the source model's own logits and a model built from a TokenformerConfig written
out by hand with today's fields (Wang value init, tau = sqrt(n)).
"""

import math

import torch

from megatron_tokenformer.arguments import core_config_from_args, parse_args, validate_args
from megatron_tokenformer.checkpointing.format.entries import FP32, ParamEntry
from megatron_tokenformer.checkpointing.grow import GrownView, plan_growth
from megatron_tokenformer.config import TokenformerConfig
from megatron_tokenformer.model import TokenformerLM

BASE = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--qkv-num-param-tokens", "16", "--proj-num-param-tokens", "16", "--ffn-num-param-tokens", "64",
        "--micro-batch-size", "2", "--train-iters", "10", "--lr", "1e-3", "--mock-data", "--vocab-size", "100"]
VOCAB = 101  # NullTokenizer: --vocab-size + end of document


def config_of(extra=()):
    return core_config_from_args(validate_args(parse_args(BASE + list(extra)), 1), VOCAB)


class _MemoryView:
    """The read interface GrownView needs, over a model's tensors (no optimizer state)."""

    def __init__(self, model):
        self.tensors = {n: p.detach().float().clone() for n, p in model.named_parameters()}
        self.params = {n: ParamEntry(n, tuple(t.shape)) for n, t in self.tensors.items()}
        self.state_keys = []

    def read(self, name, key=FP32):
        assert key == FP32
        return self.tensors[name].clone()


def grow(model, config, factor):
    plan = plan_growth(config, param_token_growth_factor=factor, seed=5)
    grown_view = GrownView(_MemoryView(model), plan)
    grown = TokenformerLM(plan.new_config)
    with torch.no_grad():
        for name, p in grown.named_parameters():
            p.copy_(grown_view.read(name))
    return grown, plan


def logits(model):
    torch.manual_seed(0)
    tokens = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        return model(tokens)


def test_defaults_reproduce_todays_model():
    config = config_of()
    assert config.value_init == "wang"
    assert (config.qkv_tau, config.proj_tau, config.ffn_tau) == (4.0, 4.0, 8.0)
    assert config.value_init_std() == 2 / (2 * math.sqrt(32))
    today = TokenformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=VOCAB,
                              qkv_num_param_tokens=16, proj_num_param_tokens=16, ffn_num_param_tokens=64).resolve_taus()
    a, b = TokenformerLM(config), TokenformerLM(today)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name
    assert torch.equal(logits(a), logits(b))


def test_options_set_the_value_std_and_tau():
    config = config_of(["--value-init-std", "0.05", "--qkv-tau", "2", "--proj-tau", "3", "--ffn-tau", "5"])
    assert config.value_init == 0.05 and (config.qkv_tau, config.proj_tau, config.ffn_tau) == (2.0, 3.0, 5.0)
    model = TokenformerLM(config)
    values = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if n.endswith("value_param_tokens")])
    assert abs(float(values.std()) / 0.05 - 1) < 0.05  # about 14k samples of N(0, 0.05^2)
    taus = {round(float(m.tau), 6) for m in model.modules() if hasattr(m, "tau") and hasattr(m, "num_param_tokens")}
    assert taus == {2.0, 3.0, 5.0}


def test_growth_with_the_options_preserves_logits():
    config = config_of(["--value-init-std", "0.05", "--qkv-tau", "2", "--proj-tau", "3", "--ffn-tau", "5"])
    model = TokenformerLM(config)
    grown, plan = grow(model, config, 4)
    assert (plan.new_config.qkv_num_param_tokens, plan.new_config.ffn_num_param_tokens) == (64, 256)
    assert (plan.new_config.qkv_tau, plan.new_config.proj_tau, plan.new_config.ffn_tau) == (2.0, 3.0, 5.0)
    assert plan.new_value_std == 0.05  # new value rows use the configured std
    new_values = grown.layers[0].mlp.value_param_tokens.detach()[64:]
    assert abs(float(new_values.std()) / 0.05 - 1) < 0.1
    diff = (logits(grown) - logits(model)).abs()
    assert float(diff[torch.isfinite(diff)].max()) <= 1e-5
