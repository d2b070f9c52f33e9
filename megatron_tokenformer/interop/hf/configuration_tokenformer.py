"""Hugging Face configuration of a Tokenformer (or of the baseline GPT) exported by megatron_tokenformer.

Self-contained (only ``transformers``): copied into the export folder and loaded with
``trust_remote_code=True``. Field names follow transformers where a concept exists there
(``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``, ``vocab_size``) and
megatron_tokenformer's model config otherwise.
"""

from transformers import PretrainedConfig


class TokenformerConfig(PretrainedConfig):
    """architecture: "tokenformer" (Pattention projections and FFN) or "transformer" (linear
    projections, GeLU MLP of width ``ffn_hidden_size``, biases).

    Pattention (per layer): Q, K, V with ``qkv_num_param_tokens`` tokens and ``qkv_tau``, the attention
    output with ``proj_*``, the FFN with ``ffn_*``; scores normalised by ``pattention_normalization``
    (``l2_norm_gelu`` | ``gelu_l2_norm`` | ``softmax``) with ``norm_epsilon_pattention`` under the root.
    Rotary embedding on the first ``rotary_dim`` channels of each head (GPT-NeoX's rotate-half).
    Block LayerNorms: ``block_layernorm`` "nonparametric" | "parametric"; the final LayerNorm is
    parametric; the output layer is tied to the input embedding.
    """

    model_type = "megatron_tokenformer"
    keys_to_ignore_at_inference = ["cache"]

    def __init__(self, vocab_size=50304, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=2048, architecture="tokenformer", qkv_num_param_tokens=768,
                 proj_num_param_tokens=768, ffn_num_param_tokens=3072, qkv_tau=None, proj_tau=None,
                 ffn_tau=None, pattention_normalization="l2_norm_gelu", norm_epsilon_pattention=1e-6,
                 rotary_dim=16, rotary_base=10000, block_layernorm="nonparametric", layernorm_epsilon=1e-5,
                 ffn_hidden_size=None, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                 tie_word_embeddings=False, use_cache=True, **kwargs):
        self.use_cache = use_cache
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.architecture = architecture
        self.qkv_num_param_tokens = qkv_num_param_tokens
        self.proj_num_param_tokens = proj_num_param_tokens
        self.ffn_num_param_tokens = ffn_num_param_tokens
        self.qkv_tau = float(qkv_tau) if qkv_tau is not None else float(qkv_num_param_tokens) ** 0.5
        self.proj_tau = float(proj_tau) if proj_tau is not None else float(proj_num_param_tokens) ** 0.5
        self.ffn_tau = float(ffn_tau) if ffn_tau is not None else float(ffn_num_param_tokens) ** 0.5
        self.pattention_normalization = pattention_normalization
        self.norm_epsilon_pattention = norm_epsilon_pattention
        self.rotary_dim = rotary_dim
        self.rotary_base = rotary_base
        self.block_layernorm = block_layernorm
        self.layernorm_epsilon = layernorm_epsilon
        self.ffn_hidden_size = ffn_hidden_size if ffn_hidden_size is not None else 4 * hidden_size
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
