"""The FLOPs formula (training/flops.py, DESIGN.md §6) against torch's own FLOP counter on the model."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megatron_tokenformer.config import TokenformerConfig
from megatron_tokenformer.model import TokenformerLM
from megatron_tokenformer.training.flops import (
    DEVICE_NAMES,
    PEAK_TFLOPS,
    forward_flops_per_token,
    peak_tflops,
    peak_tflops_for_device,
    training_flops_per_token,
    training_precision,
)


def test_forward_flops_match_torch_flop_counter():
    """torch counts every matmul of the real forward pass: the Pattentions' X K^T and S V and the logits.
    Its counter does not see inside CPU's fused attention kernel, so the token-token part is counted on
    the plain matmul form of the same attention (Q K^T and P V over all T positions: the causal mask does
    not reduce the math, and the formula does not halve it)."""
    cfg = TokenformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=24, vocab_size=200,
                            qkv_num_param_tokens=16, proj_num_param_tokens=8, ffn_num_param_tokens=48)
    model = TokenformerLM(cfg, seed=3)
    batch, T, d, heads = 2, 24, 32, 4
    ids = torch.randint(0, 200, (batch, T))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids)
    q = k = v = torch.randn(batch, heads, T, d // heads)
    with FlopCounterMode(display=False) as attention, torch.no_grad():
        torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
    measured = counter.get_total_flops() + cfg.num_layers * attention.get_total_flops()
    predicted = forward_flops_per_token(2, d, T, cfg.padded_vocab_size(1), 16, 8, 48) * batch * T
    assert measured == pytest.approx(predicted, rel=1e-9)


def test_training_flops_multipliers():
    cfg = TokenformerConfig(num_layers=3, hidden_size=64, num_attention_heads=4, seq_length=32, vocab_size=256,
                            qkv_num_param_tokens=64, proj_num_param_tokens=64, ffn_num_param_tokens=256)
    d, T, V, L = 64, 32, 256, 3
    fwd = L * (4 * d * (3 * 64 + 64 + 256) + 4 * T * d) + 2 * d * V
    assert training_flops_per_token(cfg, V) == 3 * fwd
    cfg.checkpoint_activations = True
    assert training_flops_per_token(cfg, V) == 4 * fwd  # hardware FLOPs include the recomputed forward
    assert training_flops_per_token(cfg, V, hardware=False) == 3 * fwd  # model FLOPs, for MFU


def test_peak_tflops():
    assert peak_tflops_for_device(123.0) == 123.0
    if not torch.cuda.is_available():
        assert peak_tflops_for_device(None) is None  # CPU: MFU reported as n/a


# Dense peaks from the vendors' data sheets (H100/H200: Hopper data sheets; A100: Ampere data sheet), written
# out here independently of the table: (device name as CUDA reports it, precision, TFLOP/s).
DATASHEET = [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4), ("NVIDIA H100 80GB HBM3", "tf32", 494.7),
    ("NVIDIA H100 80GB HBM3", "fp32", 67.0),
    ("NVIDIA H100 PCIe", "bf16", 756.0), ("NVIDIA H100 PCIe", "tf32", 378.0),
    ("NVIDIA H100 NVL", "bf16", 835.5), ("NVIDIA H100 NVL", "fp16", 835.5),
    ("NVIDIA H200", "bf16", 989.4), ("NVIDIA H200", "fp32", 67.0),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0), ("NVIDIA A100-SXM4-40GB", "tf32", 156.0),
    ("NVIDIA A100-PCIE-40GB", "bf16", 312.0), ("NVIDIA A100 80GB PCIe", "fp32", 19.5),
    # H800 / A800 data sheets (same tensor-core peaks as H100 SXM / A100), H800 PCIe (1,513 TFLOPS bf16 with
    # sparsity), H20 (148 TFLOPS bf16 dense), L40S (733 sparse), A40 (299.4 sparse), L4 (242 sparse)
    ("NVIDIA H800", "bf16", 989.4), ("NVIDIA H800 80GB HBM3", "tf32", 494.7), ("NVIDIA H800 PCIe", "bf16", 756.0),
    ("NVIDIA H20", "bf16", 148.0), ("NVIDIA A800-SXM4-80GB", "bf16", 312.0), ("NVIDIA A800 80GB PCIe", "tf32", 156.0),
    ("NVIDIA L40S", "bf16", 362.1), ("NVIDIA A40", "bf16", 149.7), ("NVIDIA L4", "fp16", 121.0),
]


@pytest.mark.parametrize("name, precision, expected", DATASHEET)
def test_peak_by_exact_device_name_and_precision(name, precision, expected):
    assert peak_tflops(name, precision) == expected


def test_pcie_and_nvl_do_not_get_the_sxm_peak():
    sxm = peak_tflops("NVIDIA H100 80GB HBM3", "bf16")
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") < sxm and peak_tflops("NVIDIA H100 NVL", "bf16") < sxm


def test_unknown_device_has_no_peak():
    """Never a substring guess: an unlisted name (a new H100 variant, an RTX card) gives MFU n/a."""
    assert peak_tflops("NVIDIA H100 96GB Something", "bf16") is None
    assert peak_tflops("NVIDIA GeForce RTX 4090", "bf16") is None
    with pytest.raises(ValueError):
        peak_tflops("NVIDIA H200", "int8")


def test_table_rows_follow_the_tensor_core_ratios():
    """On Ampere, Hopper and Ada, dense TF32 is half of dense BF16, and FP16 equals BF16."""
    assert set(DEVICE_NAMES.values()) <= set(PEAK_TFLOPS)
    for row, peaks in PEAK_TFLOPS.items():
        assert peaks["fp16"] == peaks["bf16"], row
        assert peaks["tf32"] == pytest.approx(peaks["bf16"] / 2, rel=0.02), row
        assert peaks["fp32"] < peaks["tf32"], row


def test_training_precision():
    assert training_precision(bf16=True, fp16=False, tf32_allowed=False) == "bf16"
    assert training_precision(bf16=False, fp16=True, tf32_allowed=True) == "fp16"
    assert training_precision(bf16=False, fp16=False, tf32_allowed=True) == "tf32"
    assert training_precision(bf16=False, fp16=False, tf32_allowed=False) == "fp32"
