"""The training loop's host synchronisation points and data-loader settings (training/loop.py).

A stand-in engine (a linear model behind DeepSpeed's engine interface) runs the real ``train()`` on
CPU; the collectives that make the host wait (exit agreement, data-parallel loss averaging) are
recorded per iteration.
"""

import argparse

import pytest
import torch

from megatron_tokenformer.config import TokenformerConfig
from megatron_tokenformer.data.gpt_dataset import MockGPTDataset
from megatron_tokenformer.training import loop


class StandInEngine(torch.nn.Module):
    """forward(tokens, labels, mask) -> scalar loss; backward/step as DeepSpeed's engine names them."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.lr_scheduler = None
        self.skipped_steps = 0
        self.steps = 0

    def forward(self, tokens, labels, loss_mask):
        return (self.weight * tokens.float().mean() - labels.float().mean()) ** 2

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.steps += 1

    def get_global_grad_norm(self):
        return 1.0


def _args(**overrides):
    base = dict(global_batch_size=2, micro_batch_size=1, gradient_accumulation_steps=2, seq_length=8, train_iters=10,
                log_interval=4, eval_interval=1000, eval_iters=0, save=None, save_interval=None, exit_interval=None,
                exit_duration_in_mins=None, peak_tflops=None, bf16=False, fp16=False, lr=1e-3,
                tokenizer_model=None, tensor_model_parallel_size=1, num_workers=0)
    base.update(overrides)
    return argparse.Namespace(**base)


def test_host_waits_only_at_log_intervals(monkeypatch, capsys):
    args = _args()
    cfg = TokenformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, seq_length=8, vocab_size=32,
                            qkv_num_param_tokens=4, proj_num_param_tokens=4, ffn_num_param_tokens=8)
    engine = StandInEngine()
    train_iter, _ = loop.build_data_iterators(args, MockGPTDataset(40, 8, 32), None, 0, 0, torch.device("cpu"),
                                              pipelined=False)
    synced = []  # iterations (completed so far) at which a host-waiting collective ran
    monkeypatch.setattr(loop, "_agree_on_exit", lambda flag, device: synced.append(("exit", engine.steps // 2)))
    real_average = loop._dp_average
    monkeypatch.setattr(loop, "_dp_average", lambda v: (synced.append(("loss", engine.steps // 2)), real_average(v))[1])
    iteration, consumed, reason = loop.train(args, engine, cfg, train_iter, None, 0, 0, torch.device("cpu"), 0.0)
    assert (iteration, consumed, reason) == (10, 20, "train-iters")
    assert engine.steps == 20  # every micro-batch stepped
    logged = [4, 8, 10]  # every --log-interval and the last iteration
    assert synced == [item for it in logged for item in (("loss", it), ("exit", it))]
    out = capsys.readouterr().out
    assert [int(line.split()[1].split("/")[0]) for line in out.splitlines() if line.startswith(" iteration")] == logged


@pytest.mark.parametrize("overrides, due", [
    ({}, [4, 8, 10]),
    ({"save": "/ckpt", "save_interval": 3}, [3, 4, 6, 8, 9, 10]),
    ({"save_interval": 3}, [4, 8, 10]),  # no --save: nothing is saved, nothing to wait for
    ({"exit_interval": 5}, [4, 5, 8, 10]),
])
def test_exit_check_due(overrides, due):
    args = _args(**overrides)
    assert [i for i in range(1, 11) if loop.exit_check_due(i, args)] == due


def test_data_loader_pins_memory_only_for_cuda(monkeypatch):
    from megatron_tokenformer.data import samplers
    seen = []
    real = samplers.build_pretraining_data_loader

    def spy(*a, **k):
        seen.append((k["num_workers"], k["pin_memory"]))
        return real(*a, **k)

    monkeypatch.setattr(samplers, "build_pretraining_data_loader", spy)
    ds = MockGPTDataset(8, 8, 32)
    loop.build_data_iterators(_args(num_workers=2, eval_iters=1), ds, ds, 0, 0, torch.device("cpu"), False)
    loop.build_data_iterators(_args(num_workers=2, eval_iters=1), ds, ds, 0, 0, torch.device("cuda", 0), False)
    assert seen == [(2, False), (2, False), (2, True), (2, True)]


def test_num_workers_default_is_two():
    from megatron_tokenformer.arguments import parse_args
    assert parse_args(["--num-layers", "1"]).num_workers == 2
