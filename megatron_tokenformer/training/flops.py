"""FLOPs per trained token and model FLOPs utilisation (docs/design.md §6).

The forward count of each model family is its spec's (:meth:`megatron_tokenformer.model.spec.ModelSpec.
forward_flops_per_token`); the two formulas, re-exported here, are:

Forward FLOPs per token (a multiply-add counts 2):

* a Pattention d1 -> d2 with n parameter tokens: ``X K^T`` costs 2 n d1, ``S V`` 2 n d2, so
  ``2 n (d1 + d2)``; every Pattention in the model maps d -> d: ``4 n d``;
* per block: Q, K, V (``n_qkv`` tokens each) + output projection (``n_proj``) + FFN (``n_ffn``):
  ``4 d (3 n_qkv + n_proj + n_ffn)``;
* token-token attention: ``Q K^T`` and ``softmax(.) V`` over the ``T`` positions of the sequence:
  ``2 T d + 2 T d = 4 T d`` per token. **Not halved for causality** (Megatron's and PaLM's
  convention: the masked half is counted, so MFU figures compare with theirs);
* logits (the tied output layer): ``2 d V`` with ``V`` the padded vocabulary actually multiplied;
* normalisations, rotary, GeLU, softmax and the loss are not counted (O(d) per token).

``F = L * (4 d (3 n_qkv + n_proj + n_ffn) + 4 T d) + 2 d V``

The baseline Transformer (``--model-type transformer``, MLP width ``f = ffn_hidden_size``): Q, K,
V and the output projection are d x d matrices (``2 d^2`` each), the MLP ``d -> f -> d`` costs
``2 d f + 2 f d``; biases, GeLU and norms are O(d) and not counted; attention and logits as above:

``F_transformer = L * (8 d^2 + 4 d f + 4 T d) + 2 d V``  (with f = 4d: ``L * (24 d^2 + 4 T d) + 2 d V``)

This is the Tokenformer formula with every Pattention ``4 n d`` replaced by the matrix's ``2 d1 d2``,
i.e. a Pattention with n tokens costs as much as a d x d linear layer when n = d / 2.

A training step costs ``3 F`` per token (forward + backward = 2 x forward); with full activation
recomputation (``--checkpoint-activations``) the hardware executes ``4 F``. We report
*TFLOP/s per GPU* from the hardware count (as Megatron does) and *MFU* from the model count
``3 F`` divided by the device's peak.
"""

from __future__ import annotations

from typing import Optional

from megatron_tokenformer.model.spec import get_spec, transformer_forward_flops_per_token
from megatron_tokenformer.model.spec import tokenformer_forward_flops_per_token as forward_flops_per_token

__all__ = ["forward_flops_per_token", "transformer_forward_flops_per_token", "training_flops_per_token",
           "peak_tflops_for_device", "PEAK_TFLOPS", "DEVICE_NAMES", "peak_tflops", "training_precision"]

#: dense (no sparsity) peak TFLOP/s of one device per matmul precision, from the vendors' data sheets
PEAK_TFLOPS = {
    "H100 SXM": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4},
    "H100 PCIe": {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0},
    "H100 NVL": {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5},
    "H200 SXM": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4},
    "H200 NVL": {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5},
    "GH200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0},  # SXM and PCIe, 40 and 80 GB
    "L40S": {"fp32": 91.6, "tf32": 183.0, "bf16": 362.1, "fp16": 362.1},
    "A10": {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0, "fp16": 125.0},
    # export variants and other cluster cards (the data sheets' sparse figures halved where only those are given)
    "H800 SXM": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4},  # H100 SXM's tensor cores
    "H800 PCIe": {"fp32": 51.0, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0},
    "H20": {"fp32": 44.0, "tf32": 74.0, "bf16": 148.0, "fp16": 148.0},
    "A800": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0},  # A100's tensor cores
    "A40": {"fp32": 37.4, "tf32": 74.8, "bf16": 149.7, "fp16": 149.7},
    "L4": {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "fp16": 121.0},
}

#: ``torch.cuda.get_device_name()`` -> row of :data:`PEAK_TFLOPS`. Matched exactly: a substring match
#: would give an H100 PCIe or NVL the SXM peak. Unknown devices get no peak (MFU n/a; pass --peak-tflops).
DEVICE_NAMES = {
    "NVIDIA H100 80GB HBM3": "H100 SXM",
    "NVIDIA H100 SXM5 80GB": "H100 SXM",
    "NVIDIA H100 PCIe": "H100 PCIe",
    "NVIDIA H100 NVL": "H100 NVL",
    "NVIDIA H200": "H200 SXM",
    "NVIDIA H200 NVL": "H200 NVL",
    "NVIDIA GH200 480GB": "GH200",
    "NVIDIA GH200 144G HBM3e": "GH200",
    "NVIDIA A100-SXM4-40GB": "A100",
    "NVIDIA A100-SXM4-80GB": "A100",
    "NVIDIA A100-SXM-80GB": "A100",
    "NVIDIA A100-PCIE-40GB": "A100",
    "NVIDIA A100 80GB PCIe": "A100",
    "NVIDIA L40S": "L40S",
    "NVIDIA A10": "A10",
    "NVIDIA H800": "H800 SXM",
    "NVIDIA H800 80GB HBM3": "H800 SXM",
    "NVIDIA H800 PCIe": "H800 PCIe",
    "NVIDIA H20": "H20",
    "NVIDIA A800-SXM4-80GB": "A800",
    "NVIDIA A800-SXM4-40GB": "A800",
    "NVIDIA A800 80GB PCIe": "A800",
    "NVIDIA A800-PCIE-40GB": "A800",
    "NVIDIA A40": "A40",
    "NVIDIA L4": "L4",
}

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


def peak_tflops(device_name: str, precision: str) -> Optional[float]:
    """Dense peak TFLOP/s of the device called ``device_name`` (exactly as CUDA reports it) for matmuls
    in ``precision`` (fp32, tf32, bf16, fp16); None for a device not in the table."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    row = DEVICE_NAMES.get(device_name.strip())
    return None if row is None else PEAK_TFLOPS[row][precision]


def training_precision(bf16: bool, fp16: bool, tf32_allowed: bool) -> str:
    """The matmul precision a run computes in: bf16/fp16 when enabled, else tf32 when fp32 matmuls may
    use TF32 (``torch.backends.cuda.matmul.allow_tf32`` / float32 matmul precision below "highest")."""
    if bf16:
        return "bf16"
    if fp16:
        return "fp16"
    return "tf32" if tf32_allowed else "fp32"


def training_flops_per_token(config, padded_vocab_size: int, recompute: Optional[bool] = None,
                             hardware: bool = True) -> float:
    """FLOPs per trained token for a :class:`ModelConfig`.

    ``hardware=True`` includes the recomputed forward when activations are checkpointed (4 F),
    ``hardware=False`` gives the model FLOPs (3 F) used for MFU.
    """
    fwd = get_spec(config).forward_flops_per_token(config, padded_vocab_size)
    if recompute is None:
        recompute = bool(getattr(config, "checkpoint_activations", False))
    return (4.0 if (hardware and recompute) else 3.0) * fwd


def peak_tflops_for_device(explicit: Optional[float] = None, precision: str = "bf16") -> Optional[float]:
    """``explicit`` if given; else the table value for this CUDA device in ``precision``; None (MFU n/a)
    without CUDA or for a device not in the table."""
    if explicit is not None:
        return float(explicit)
    try:
        import torch
        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name()
    except Exception:  # pragma: no cover - no usable CUDA
        return None
    return peak_tflops(name, precision)
