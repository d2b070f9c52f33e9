"""Log line format, evaluation line, parameter counts and TensorBoard scalars."""

import math
import re

import pytest

from megatron_tokenformer.config import TokenformerConfig
from megatron_tokenformer.model import TokenformerLM
from megatron_tokenformer.training.logging import (
    TensorBoardLogger,
    count_model_parameters,
    format_eval_line,
    format_parameter_summary,
    format_train_line,
)
from tests.helpers import train_runs


def test_train_line_is_megatron_format_and_parses():
    line = format_train_line(12, 100, 192, 345.67, 2.5e-4, 16, 3.14159265, 65536.0, 0.75, 1, 0, 1234.5, 0.0123, 0.4)
    for field in ("iteration       12/     100 |", "consumed samples:", "elapsed time per iteration (ms): 345.7 |",
                  "learning rate: 2.500000E-04 |", "global batch size:    16 |", "lm loss: 3.141593E+00 |",
                  "loss scale: 65536.0 |", "grad norm: 0.750000 |", "number of skipped iterations:   1 |",
                  "number of nan iterations:   0 |", "tokens/s: 1234.5 |", "TFLOP/s per GPU: 0.012 |", "MFU: 40.00% |"):
        assert field in line, field
    row = train_runs.parse_iterations(line)[0]
    assert row["iteration"] == 12 and row["lm loss"] == pytest.approx(3.14159265, rel=1e-6)
    assert "MFU: n/a |" in format_train_line(1, 1, 1, 1.0, 1.0, 1, 1.0, None, None, 0, 0, 1.0, None, None)


def test_eval_line_has_loss_and_perplexity():
    text = format_eval_line(100, 2.0)
    assert re.search(r"validation loss at iteration 100 \| lm loss value: 2\.000000E\+00 \| lm loss PPL: "
                     r"7\.389056E\+00", text)
    assert train_runs.parse_validation(text) == [2.0]


def test_parameter_count_single_process():
    cfg = TokenformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=100,
                            qkv_num_param_tokens=16, proj_num_param_tokens=8, ffn_num_param_tokens=24)
    per_stage, total = count_model_parameters(TokenformerLM(cfg), cfg)
    d, L = 32, 2
    assert total["qkv pattention"] == L * 3 * 2 * 16 * d   # key + value tokens of Q, K, V
    assert total["proj pattention"] == L * 2 * 8 * d
    assert total["ffn pattention"] == L * 2 * 24 * d
    assert total["embedding"] == 128 * d                    # 100 padded to 128
    assert total["layernorm"] == 2 * d                      # final LayerNorm weight + bias
    assert len(per_stage) == 1 and sum(per_stage[0].values()) == sum(total.values())
    assert f"{sum(total.values()):,}" in format_parameter_summary(per_stage, total)


def test_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tb = TensorBoardLogger(str(tmp_path))
    for step, loss in ((1, 5.0), (2, 4.0)):
        tb.add_scalars({"lm loss": loss, "mfu": None, "grad-norm": math.nan}, step)
    tb.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert acc.Tags()["scalars"] == ["lm loss"]  # None / NaN values are not written
    assert [(e.step, e.value) for e in acc.Scalars("lm loss")] == [(1, 5.0), (2, 4.0)]
