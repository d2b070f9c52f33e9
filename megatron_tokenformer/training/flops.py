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

from megatron_tokenformer.model.spec import get_spec
from megatron_tokenformer.model.spec import tokenformer_forward_flops_per_token as forward_flops_per_token
from megatron_tokenformer.model.spec import transformer_forward_flops_per_token

__all__ = ["forward_flops_per_token", "transformer_forward_flops_per_token", "training_flops_per_token", "peak_tflops_for_device",
           "PEAK_TFLOPS"]

#: dense bf16/fp16 peaks of one device, TFLOP/s
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def training_flops_per_token(config, padded_vocab_size: int, recompute: Optional[bool] = None,
                             hardware: bool = True) -> float:
    """FLOPs per trained token for a :class:`TokenformerConfig`.

    ``hardware=True`` includes the recomputed forward when activations are checkpointed (4 F),
    ``hardware=False`` gives the model FLOPs (3 F) used for MFU.
    """
    fwd = get_spec(config).forward_flops_per_token(config, padded_vocab_size)
    if recompute is None:
        recompute = bool(getattr(config, "checkpoint_activations", False))
    return (4.0 if (hardware and recompute) else 3.0) * fwd


def peak_tflops_for_device(explicit: Optional[float] = None) -> Optional[float]:
    """``explicit`` if given; else the table value for this CUDA device; None (MFU n/a) otherwise."""
    if explicit is not None:
        return float(explicit)
    try:
        import torch
        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name()
    except Exception:  # pragma: no cover - no usable CUDA
        return None
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return None
