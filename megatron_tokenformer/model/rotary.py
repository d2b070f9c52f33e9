"""Rotary position embedding on the first ``rotary_dim`` channels of each head (GPT-NeoX style)."""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions 0..s-1, fp32, [s, rotary_dim] (computed on the fly, no buffers,
    so casting the model to bf16 does not degrade the frequencies)."""

    def __init__(self, rotary_dim: int, base: float = 10000.0):
        super().__init__()
        if rotary_dim % 2 != 0:
            raise ValueError(f"rotary_dim must be even, got {rotary_dim}")
        self.rotary_dim = rotary_dim
        self.base = float(base)
        self._cache = None

    def forward(self, seq_len: int, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
        key = (seq_len, str(device))
        if self._cache is None or self._cache[0] != key:
            exponent = torch.arange(0, self.rotary_dim, 2, dtype=torch.float64, device=device) / self.rotary_dim
            inv_freq = (1.0 / self.base ** exponent).float()
            positions = torch.arange(seq_len, dtype=torch.float32, device=device)
            freqs = torch.outer(positions, inv_freq)
            emb = torch.cat([freqs, freqs], dim=-1)
            self._cache = (key, emb.cos(), emb.sin())
        return self._cache[1], self._cache[2]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rotary_pos_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [b, s, h, head_dim]; cos, sin: [s, rotary_dim]. Rotates x[..., :rotary_dim] in fp32."""
    rotary_dim = cos.shape[-1]
    if rotary_dim == 0:
        return x
    rot, rest = x[..., :rotary_dim].float(), x[..., rotary_dim:]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    rot = rot * cos + _rotate_half(rot) * sin
    return torch.cat([rot.to(x.dtype), rest], dim=-1)
