"""Plain single-process references for the model's math, written from docs/design.md, not from the package.

Everything takes and returns ordinary tensors (use float64 for references); nothing here imports
megatron_tokenformer.
"""

from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn.functional as F


def pattention_scores(a, normalization, tau, n, eps=1e-6):
    """f(A) of docs/design.md §1 over the last dim of the scores A [..., n_local]: tau (the temperature) and n
    (the GLOBAL parameter-token count, the softmax scale) as the layer has them.

        l2_norm_gelu:  GeLU(tau A / sqrt(sum A² + eps))
        gelu_l2_norm:  tau GeLU(A) / sqrt(sum GeLU(A)² + eps)
        softmax:       n softmax(A)
    """
    if normalization == "l2_norm_gelu":
        return F.gelu(tau * a / torch.sqrt((a * a).sum(-1, keepdim=True) + eps))
    if normalization == "gelu_l2_norm":
        g = F.gelu(a)
        return tau * g / torch.sqrt((g * g).sum(-1, keepdim=True) + eps)
    if normalization == "softmax":
        return n * torch.softmax(a, dim=-1)
    raise ValueError(normalization)


def pattention(x, keys, values, normalization, tau, eps=1e-6):
    """Pattention(x) = f(x Kᵀ) V. x [..., d_in], keys [n, d_in], values [n, d_out] -> [..., d_out]. The one
    reference Pattention of the tests: pass float64 tensors."""
    return pattention_scores(x @ keys.T, normalization, tau, keys.shape[0], eps) @ values


def rotary(x, rotary_dim, base=10000.0, positions=None):
    """GPT-NeoX rotary on x [b, s, h, hd] as a complex rotation: the channel pair (j, j + rotary_dim/2),
    j < rotary_dim/2, read as the complex number x_j + i x_{j+half}, is multiplied by
    exp(i * pos * base^(-2j/rotary_dim)); channels from rotary_dim on are unchanged."""
    if rotary_dim == 0:
        return x
    half = rotary_dim // 2
    if positions is None:
        positions = torch.arange(x.shape[1])
    theta = positions.double()[:, None] * base ** (-2.0 * torch.arange(half, dtype=torch.float64) / rotary_dim)
    z = torch.complex(x[..., :half].double(), x[..., half:rotary_dim].double())
    z = z * torch.polar(torch.ones_like(theta), theta)[None, :, None, :]
    return torch.cat([z.real.to(x.dtype), z.imag.to(x.dtype), x[..., rotary_dim:]], dim=-1)


def causal_attention(q, k, v, rotary_dim=0, base=10000.0):
    """Multi-head causal softmax attention. q, k, v: [b, s, h, hd] -> [b, s, h * hd]."""
    b, s, h, hd = q.shape
    q, k = rotary(q, rotary_dim, base), rotary(k, rotary_dim, base)
    scores = torch.einsum("bqhc,bkhc->bhqk", q, k) / math.sqrt(hd)
    future = torch.ones(s, s, dtype=torch.bool).triu(1)
    probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    return torch.einsum("bhqk,bkhc->bqhc", probs, v).reshape(b, s, h * hd)


def layer_norm(x, eps, weight=None, bias=None):
    """(x - mean) / sqrt(biased variance + eps) over the last dim, then the optional affine map."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight + bias
    return y


def tokenformer_attention(x, p: Dict[str, torch.Tensor], prefix, heads, normalization, taus, eps, rotary_dim,
                          base=10000.0):
    """Attention of one Tokenformer block from the full (TP = 1) parameters ``p`` (names ``prefix + "query.
    key_param_tokens"``...): Q, K, V, O are Pattentions; taus = {"qkv": tau, "proj": tau}. x: [b, s, d]."""
    b, s, d = x.shape

    def pat(inp, name, tau):
        return pattention(inp, p[f"{prefix}{name}.key_param_tokens"], p[f"{prefix}{name}.value_param_tokens"],
                          normalization, tau, eps)

    q, k, v = (pat(x, n, taus["qkv"]).view(b, s, heads, d // heads) for n in ("query", "key", "value"))
    return pat(causal_attention(q, k, v, rotary_dim, base), "dense", taus["proj"])


def tokenformer_block(x, p: Dict[str, torch.Tensor], heads, normalization, taus, eps, rotary_dim, ln_eps,
                      parametric, base=10000.0):
    """X + Attention(LN(X)), then + FFN(LN(X)) with FFN = one Pattention; taus also holds "ffn"."""
    def ln(t, name):
        if parametric:
            return layer_norm(t, ln_eps, p[name + ".weight"], p[name + ".bias"])
        return layer_norm(t, ln_eps)

    h = x + tokenformer_attention(ln(x, "input_layernorm"), p, "attention.", heads, normalization, taus, eps,
                                  rotary_dim, base)
    return h + pattention(ln(h, "post_attention_layernorm"), p["mlp.key_param_tokens"], p["mlp.value_param_tokens"],
                          normalization, taus["ffn"], eps)
