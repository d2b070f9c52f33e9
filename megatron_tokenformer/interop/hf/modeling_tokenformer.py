"""Hugging Face model of a Tokenformer (arXiv 2410.23168), or of the baseline GPT, exported by
megatron_tokenformer (``tools/export_hf.py``).

Self-contained: only torch and transformers. Copied into the export folder, loaded with
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``. Computes the same function
as megatron_tokenformer's model at tensor-parallel size 1:

    ids [b, s] -> embedding -> L x block -> final LayerNorm -> logits = h @ embeddingᵀ   (tied)
    block: x = x + Attention(LN1(x)); x = x + FFN(LN2(x))

Tokenformer block: Q, K, V, attention output and FFN are Pattentions
``O = f(X Kᵀ) V`` (K, V: n parameter tokens; f per ``pattention_normalization``, statistics in fp32):

    l2_norm_gelu:  GeLU(tau * A / sqrt(sum A² + eps))
    gelu_l2_norm:  tau * GeLU(A) / sqrt(sum GeLU(A)² + eps)
    softmax:       n * softmax(A)

Transformer block: linear Q/K/V/output with biases, MLP ``W2 GeLU(W1 x + b1) + b2``.
Attention: causal, rotary on the first ``rotary_dim`` channels of each head, keys/values cached in a
transformers ``Cache`` for generation; a 2D ``attention_mask`` (left padding) masks padded keys and
``position_ids`` (from the mask in ``generate``) place the rotary positions.

Parameter names are megatron_tokenformer's canonical names under ``model.``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

try:
    from .configuration_tokenformer import TokenformerConfig
except ImportError:  # loaded as a top-level module
    from configuration_tokenformer import TokenformerConfig


class TokenformerLayerNorm(nn.Module):
    """LayerNorm in fp32, cast back; without parameters when ``parametric`` is False."""

    def __init__(self, hidden_size: int, eps: float, parametric: bool):
        super().__init__()
        self.hidden_size, self.eps = hidden_size, eps
        if parametric:
            self.weight = nn.Parameter(torch.ones(hidden_size))
            self.bias = nn.Parameter(torch.zeros(hidden_size))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x):
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), (self.hidden_size,), w, b, self.eps).to(x.dtype)


class Pattention(nn.Module):
    """Token-parameter attention: [..., d_in] -> [..., d_out] with n key/value parameter tokens."""

    def __init__(self, d_in: int, d_out: int, num_tokens: int, tau: float, normalization: str, eps: float):
        super().__init__()
        self.key_param_tokens = nn.Parameter(torch.empty(num_tokens, d_in))
        self.value_param_tokens = nn.Parameter(torch.empty(num_tokens, d_out))
        self.num_tokens, self.tau, self.normalization, self.eps = num_tokens, float(tau), normalization, eps

    def forward(self, x):
        a = F.linear(x, self.key_param_tokens).float()
        if self.normalization == "l2_norm_gelu":
            s = F.gelu(a * (self.tau * torch.rsqrt((a * a).sum(-1, keepdim=True) + self.eps)))
        elif self.normalization == "gelu_l2_norm":
            g = F.gelu(a)
            s = g * (self.tau * torch.rsqrt((g * g).sum(-1, keepdim=True) + self.eps))
        elif self.normalization == "softmax":
            s = torch.softmax(a, dim=-1) * float(self.num_tokens)
        else:
            raise ValueError(f"unknown pattention_normalization {self.normalization!r}")
        return s.to(x.dtype) @ self.value_param_tokens


def rotary_cos_sin(position_ids, rotary_dim: int, base: float):
    """position_ids [b, s] -> cos, sin [b, s, rotary_dim] (fp32)."""
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.float64, device=position_ids.device) / rotary_dim
    inv_freq = (1.0 / base ** exponent).float()
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x, cos, sin):
    """x [b, h, s, head_dim]; rotate the first rotary_dim channels (rotate-half) in fp32."""
    r = cos.shape[-1]
    if r == 0:
        return x
    rot, rest = x[..., :r].float(), x[..., r:]
    first, second = rot.chunk(2, dim=-1)
    rot = rot * cos[:, None] + torch.cat([-second, first], dim=-1) * sin[:, None]
    return torch.cat([rot.to(x.dtype), rest], dim=-1)


class TokenformerAttention(nn.Module):
    def __init__(self, config: TokenformerConfig, layer_idx: int):
        super().__init__()
        d = config.hidden_size
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = d // self.num_heads
        self.rotary_dim = config.rotary_dim
        self.rotary_base = float(config.rotary_base)
        if config.architecture == "tokenformer":
            common = dict(normalization=config.pattention_normalization, eps=config.norm_epsilon_pattention)
            self.query = Pattention(d, d, config.qkv_num_param_tokens, config.qkv_tau, **common)
            self.key = Pattention(d, d, config.qkv_num_param_tokens, config.qkv_tau, **common)
            self.value = Pattention(d, d, config.qkv_num_param_tokens, config.qkv_tau, **common)
            self.dense = Pattention(d, d, config.proj_num_param_tokens, config.proj_tau, **common)
        else:
            self.query, self.key, self.value, self.dense = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x, position_ids, mask, cache=None):
        b, s, _ = x.shape
        shape = (b, s, self.num_heads, self.head_dim)
        q, k, v = (proj(x).view(shape).transpose(1, 2) for proj in (self.query, self.key, self.value))
        if self.rotary_dim > 0:
            cos, sin = rotary_cos_sin(position_ids, self.rotary_dim, self.rotary_base)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if mask is None:
            context = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.dense(context.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))


class TokenformerMLP(nn.Module):
    """The baseline GPT's MLP (the Tokenformer's FFN is one Pattention)."""

    def __init__(self, config: TokenformerConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.ffn_hidden_size)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size)

    def forward(self, x):
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))


class TokenformerBlock(nn.Module):
    def __init__(self, config: TokenformerConfig, layer_idx: int):
        super().__init__()
        parametric = config.block_layernorm == "parametric"
        self.input_layernorm = TokenformerLayerNorm(config.hidden_size, config.layernorm_epsilon, parametric)
        self.attention = TokenformerAttention(config, layer_idx)
        self.post_attention_layernorm = TokenformerLayerNorm(config.hidden_size, config.layernorm_epsilon, parametric)
        if config.architecture == "tokenformer":
            self.mlp = Pattention(config.hidden_size, config.hidden_size, config.ffn_num_param_tokens, config.ffn_tau,
                                  config.pattention_normalization, config.norm_epsilon_pattention)
        else:
            self.mlp = TokenformerMLP(config)

    def forward(self, x, position_ids, mask, cache=None):
        x = x + self.attention(self.input_layernorm(x), position_ids, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class TokenformerEmbedding(nn.Module):
    def __init__(self, config: TokenformerConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)


class TokenformerPreTrainedModel(PreTrainedModel):
    config_class = TokenformerConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["TokenformerBlock"]
    _supports_sdpa = True

    def _init_weights(self, module):
        std = 0.02
        if isinstance(module, Pattention):
            nn.init.normal_(module.key_param_tokens, std=std)
            nn.init.normal_(module.value_param_tokens, std=std)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, TokenformerLayerNorm) and module.weight is not None:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class TokenformerModel(TokenformerPreTrainedModel):
    """The body: embedding, blocks, final LayerNorm. forward -> last hidden state [b, s, d]."""

    def __init__(self, config: TokenformerConfig):
        super().__init__(config)
        self.embedding = TokenformerEmbedding(config)
        self.layers = nn.ModuleList([TokenformerBlock(config, i) for i in range(config.num_hidden_layers)])
        self.final_layernorm = TokenformerLayerNorm(config.hidden_size, config.layernorm_epsilon, True)
        self.post_init()

    def get_input_embeddings(self):
        return self.embedding.word_embeddings

    def set_input_embeddings(self, value):
        self.embedding.word_embeddings = value

    @staticmethod
    def _mask(attention_mask, b, s, past, device):
        """Boolean [b, 1, s, past + s] (True = attend), or None for the plain causal case."""
        if attention_mask is not None and attention_mask.dim() == 4:
            return attention_mask
        if (attention_mask is None or bool(attention_mask.all())) and past == 0:
            return None
        total = past + s
        key_pos = torch.arange(total, device=device)
        query_pos = torch.arange(past, total, device=device)
        mask = (key_pos[None, :] <= query_pos[:, None])[None, None].expand(b, 1, s, total)
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, -total:].bool()
        # a padded query row that sees nothing attends to itself (its output is never used)
        empty = ~mask.any(dim=-1, keepdim=True)
        diagonal = (key_pos[None, :] == query_pos[:, None])[None, None]
        return mask | (empty & diagonal)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, **kwargs):
        from transformers import DynamicCache

        if inputs_embeds is None:
            inputs_embeds = self.embedding.word_embeddings(input_ids)
        b, s, _ = inputs_embeds.shape
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + s, device=inputs_embeds.device)[None].expand(b, s)
        mask = self._mask(attention_mask, b, s, past, inputs_embeds.device)
        hidden = inputs_embeds
        for layer in self.layers:
            hidden = layer(hidden, position_ids, mask, cache if use_cache else None)
        return BaseModelOutputWithPast(last_hidden_state=self.final_layernorm(hidden),
                                       cache=cache if use_cache else None)


class TokenformerForCausalLM(TokenformerPreTrainedModel, GenerationMixin):
    """The body plus the tied output layer (logits = hidden @ embeddingᵀ)."""

    def __init__(self, config: TokenformerConfig):
        super().__init__(config)
        self.model = TokenformerModel(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embedding.word_embeddings

    def set_input_embeddings(self, value):
        self.model.embedding.word_embeddings = value

    def get_output_embeddings(self):
        return None

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         inputs_embeds=inputs_embeds, use_cache=use_cache)
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        logits = F.linear(hidden, self.model.embedding.word_embeddings.weight)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache)
