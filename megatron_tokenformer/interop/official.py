"""Import the official TokenFormer checkpoints (GPT-NeoX code of Haiyang-W/TokenFormer).

Inputs:

* a ``pytorch_model.bin`` (DeepSpeed ``zero_to_fp32`` output, as released): a flat state dict with
  the keys of GPT-NeoX's sequential model, ``sequential.<i>.…``;
* an official DeepSpeed checkpoint folder (``global_stepN/``, or its parent with ``latest``): either
  ``layer_XX-model_00-model_states.pt`` files (pipeline engine; each holds layer XX's state dict) or
  ``mp_rank_00_model_states.pt`` whose ``module`` is the sequential state dict.

and the official NeoX YAML config (JSON is valid YAML). Sequential positions, for L layers::

    0          EmbeddingPipe      word_embeddings.weight [V_pad, d]      -> embedding.word_embeddings.weight
    1          (reshape, no parameters)
    2 + i      TokenformerLayer i attention.{query,key,value}.{key,value}_param_tokens
                                                                         -> layers.i.attention.{query,key,value}.*
                                  attention.proj.{key,value}_param_tokens -> layers.i.attention.dense.*
                                  mlp.{key,value}_param_tokens            -> layers.i.mlp.*
                                  input_layernorm / post_attention_layernorm .{weight,bias} (only with
                                  ``norm: layernorm``)                    -> layers.i.<same>
    L + 2      (reshape)
    L + 3      NormPipe           norm.{weight,bias}                       -> final_layernorm.{weight,bias}
    L + 4      tied output layer (no tensor: tied to position 0)

Numerics (official code): Pattention f(A) with tau = sqrt(n) of each Pattention's token count,
exact GeLU, no bias; LayerNorm (non-parametric ``layernorm_nonparam`` blocks), rotary on
``int(head_dim * rotary_pct)`` channels of each head (rotate-half, base ``rotary_emb_base``), causal
softmax attention scaled by 1/sqrt(head_dim), tied output layer. This model computes the same
function (its norms add eps = 1e-6 under the square roots, its softmax subtracts the max).
"""

from __future__ import annotations

import glob
import math
import os
import re
from typing import Any, Dict, Optional, Tuple

import torch

from megatron_tokenformer.errors import TokenformerError
from megatron_tokenformer.fileio import check_outputs_apart

__all__ = ["OfficialImportError", "read_official_config", "official_model_config", "read_official_state_dict",
           "convert_official_state_dict", "import_official"]


class OfficialImportError(TokenformerError, ValueError):
    """Bad input (names the flag, field, file or key); nothing was written."""


NORM_TYPES = ("l2_norm_gelu", "gelu_l2_norm", "softmax")


def read_official_config(path: str) -> Dict[str, Any]:
    """The NeoX YAML/JSON config as a dict, keys with ``-`` normalised to ``_`` (as NeoX does)."""
    import yaml

    if not os.path.isfile(path):
        raise OfficialImportError(f"--config {path}: no such file")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OfficialImportError(f"--config {path}: not a YAML/JSON NeoX config ({first})") from None
    if not isinstance(data, dict):
        raise OfficialImportError(f"--config {path}: expected a mapping of NeoX arguments")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _expand_attention_config(value, num_layers: int):
    """NeoX's ``[[["tokenformer"], 12]]`` -> ["tokenformer"] * 12."""
    out = []
    try:
        for types, count in value:
            types = list(types)
            for i in range(int(count)):
                out.append(types[i % len(types)])
    except (TypeError, ValueError):
        raise OfficialImportError(f"attention_config {value!r}: expected [[[type, ...], count], ...]") from None
    if len(out) != num_layers:
        raise OfficialImportError(f"attention_config covers {len(out)} layers but num_layers is {num_layers}")
    return out


def official_model_config(neox: Dict[str, Any], vocab_size: int):
    """Our ModelConfig for the official config ``neox``; refuses (naming the field) whatever this
    model cannot represent."""
    from megatron_tokenformer.config import ModelConfig

    def get(name, default=None):
        return neox.get(name, default)

    def refuse(name, why):
        raise OfficialImportError(f"--config field {name}: {why}")

    for name in ("num_layers", "hidden_size", "num_attention_heads", "qkv_slot_num", "proj_slot_num", "ffn_slot_num",
                 "seq_length"):
        value = get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            refuse(name, f"a positive integer is required, got {value!r}")
    L = get("num_layers")
    attention = get("attention_config")
    if attention is None:
        refuse("attention_config", "missing (a Tokenformer config has [[[\"tokenformer\"], num_layers]])")
    types = _expand_attention_config(attention, L)
    other = sorted({t for t in types if t != "tokenformer"})
    if other:
        refuse("attention_config", f"attention type(s) {', '.join(other)} are not Tokenformer layers")
    norm_type = get("norm_activation_type", "l2_norm_gelu")
    if norm_type not in NORM_TYPES:
        refuse("norm_activation_type", f"{norm_type!r} is not one of {', '.join(NORM_TYPES)}")
    pos_emb = get("pos_emb", "learned")
    if pos_emb not in ("rotary", "none"):
        refuse("pos_emb", f"{pos_emb!r} is not supported (rotary or none)")
    norm = get("norm", "layernorm")
    if norm not in ("layernorm", "layernorm_nonparam"):
        refuse("norm", f"{norm!r} is not supported (layernorm_nonparam or layernorm)")
    final_norm = get("final_norm") or norm
    if final_norm not in ("layernorm", "layernorm_nonparam"):
        refuse("final_norm", f"{final_norm!r} is not supported (layernorm or layernorm_nonparam)")
    if get("no_weight_tying", False):
        refuse("no_weight_tying", "an untied output layer is not supported (the output layer is tied to the "
                                  "input embedding)")
    checks = [("gpt_j_residual", False, "the parallel (GPT-J) residual is not supported"),
              ("use_bias_in_attn_linear", None, None),
              ("use_mup", False, "muP is not supported"),
              ("transformer_increase_dim", 0, "transformer_increase_dim > 0 (incremental width) is not supported"),
              ("sliding_window_width", None, "sliding-window attention is not supported"),
              ("use_qk_layernorm", False, "QK LayerNorm is not supported")]
    for name, ok, why in checks:
        if name == "use_bias_in_attn_linear":
            if neox.get(name) is True:
                refuse(name, "a bias in the attention projections is not supported (Pattention has none)")
            continue
        value = get(name, ok)
        if value not in (ok, None, False, 0):
            refuse(name, why)
    heads, d = get("num_attention_heads"), get("hidden_size")
    if get("num_kv_heads") not in (None, heads):
        refuse("num_kv_heads", "grouped-query attention is not supported")
    if d % heads:
        refuse("hidden_size", f"{d} is not divisible by num_attention_heads {heads}")
    rotary_pct = float(get("rotary_pct", 1.0)) if pos_emb == "rotary" else 0.0
    head_dim = d // heads
    if pos_emb == "rotary" and int(head_dim * rotary_pct) % 2:
        refuse("rotary_pct", f"{rotary_pct} gives an odd number of rotary channels ({int(head_dim * rotary_pct)})")
    eps = float(get("layernorm_epsilon", 1e-5))
    seq = get("seq_length")
    n_qkv, n_proj, n_ffn = get("qkv_slot_num"), get("proj_slot_num"), get("ffn_slot_num")
    return ModelConfig(
        num_layers=L, hidden_size=d, num_attention_heads=heads, seq_length=seq,
        max_position_embeddings=max(int(get("max_position_embeddings") or seq), seq), vocab_size=int(vocab_size),
        make_vocab_size_divisible_by=int(get("make_vocab_size_divisible_by", 128)),
        qkv_num_param_tokens=n_qkv, proj_num_param_tokens=n_proj, ffn_num_param_tokens=n_ffn,
        qkv_tau=math.sqrt(n_qkv), proj_tau=math.sqrt(n_proj), ffn_tau=math.sqrt(n_ffn),
        pattention_normalization=norm_type, rotary_percent=rotary_pct,
        rotary_base=int(get("rotary_emb_base", 10000)),
        block_layernorm="parametric" if norm == "layernorm" else "nonparametric", layernorm_epsilon=eps,
        init_method_std=float(get("init_method_std", 0.02))), final_norm == "layernorm"


def _torch_load(path: str, weights_only: bool):
    if not weights_only:  # a DeepSpeed folder's file: its pickle through the allowlist before torch.load runs it
        from megatron_tokenformer.interop.checkpoint_format import check_torch_file
        problem = check_torch_file(path)
        if problem:
            raise OfficialImportError(f"--input {problem}")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as exc:  # noqa: BLE001 - a corrupt or foreign file: one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OfficialImportError(f"--input {path}: not a readable PyTorch checkpoint ({first[:200]})") from None


def read_official_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """``sequential.<i>.…`` -> tensor, from a ``.bin`` file or an official DeepSpeed folder."""
    if os.path.isfile(path):
        sd = _torch_load(path, weights_only=True)
        if isinstance(sd, dict) and "module" in sd and isinstance(sd["module"], dict):
            sd = sd["module"]
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise OfficialImportError(f"--input {path}: expected a state dict of tensors")
        return dict(sd)
    if not os.path.isdir(path):
        raise OfficialImportError(f"--input {path}: no such file or directory")
    step = path
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            step = os.path.join(path, f.read().strip())
        if not os.path.isdir(step):
            raise OfficialImportError(f"--input {path}: `latest` names {os.path.basename(step)}, which is missing")
    layer_files = sorted(glob.glob(os.path.join(step, "layer_*-model_*-model_states.pt")))
    mp_files = sorted(glob.glob(os.path.join(step, "mp_rank_*_model_states.pt")))
    if any(not re.search(r"-model_00-model_states\.pt$", f) for f in layer_files) or \
            any(not f.endswith("mp_rank_00_model_states.pt") for f in mp_files):
        raise OfficialImportError(f"--input {step}: model-parallel official checkpoints (model_01 / mp_rank_01 "
                                  "files) are not supported; convert them at model parallel size 1")
    if layer_files:
        sd = {}
        for f in layer_files:
            idx = int(re.search(r"layer_(\d+)-model_00", os.path.basename(f)).group(1))
            part = _torch_load(f, weights_only=False)
            if not isinstance(part, dict):
                raise OfficialImportError(f"--input {f}: expected a layer state dict")
            for k, v in part.items():
                sd[f"sequential.{idx}.{k}"] = v
        return sd
    if mp_files:
        ckpt = _torch_load(mp_files[0], weights_only=False)
        module = ckpt.get("module") if isinstance(ckpt, dict) else None
        if not isinstance(module, dict) or not module:
            raise OfficialImportError(f"--input {mp_files[0]}: no `module` state dict (and no layer_XX files)")
        return dict(module)
    raise OfficialImportError(f"--input {step}: no layer_XX-model_00-model_states.pt or mp_rank_00_model_states.pt "
                              "files (not an official DeepSpeed checkpoint folder)")


def convert_official_state_dict(sd: Dict[str, torch.Tensor], config, final_parametric: bool) -> Dict[str, torch.Tensor]:
    """Official keys -> canonical names (fp32; embedding rows trimmed to ``config.vocab_size``).
    Refuses (naming the key) unexpected keys, missing keys and shapes that do not match the config."""
    L, d = config.num_layers, config.hidden_size
    expected: Dict[str, Tuple[str, Tuple[int, ...]]] = {}
    expected["sequential.0.word_embeddings.weight"] = ("embedding.word_embeddings.weight", (None, d))
    for i in range(L):
        p, q = f"sequential.{i + 2}.", f"layers.{i}."
        for ours, theirs, n in (("attention.query", "attention.query", config.qkv_num_param_tokens),
                                ("attention.key", "attention.key", config.qkv_num_param_tokens),
                                ("attention.value", "attention.value", config.qkv_num_param_tokens),
                                ("attention.dense", "attention.proj", config.proj_num_param_tokens),
                                ("mlp", "mlp", config.ffn_num_param_tokens)):
            for kind in ("key_param_tokens", "value_param_tokens"):
                expected[f"{p}{theirs}.{kind}"] = (f"{q}{ours}.{kind}", (n, d))
        if config.block_layernorm == "parametric":
            for ln in ("input_layernorm", "post_attention_layernorm"):
                for w in ("weight", "bias"):
                    expected[f"{p}{ln}.{w}"] = (f"{q}{ln}.{w}", (d,))
    if final_parametric:
        for w in ("weight", "bias"):
            expected[f"sequential.{L + 3}.norm.{w}"] = (f"final_layernorm.{w}", (d,))
    out: Dict[str, torch.Tensor] = {}
    for key in sd:
        if key.endswith("rotary_emb.inv_freq"):
            continue  # a buffer (rotary_save_freqs_buffer); recomputed
        if key not in expected:
            raise OfficialImportError(f"state dict key {key}: not a parameter of the model the config describes")
    for key, (name, shape) in expected.items():
        if key not in sd:
            raise OfficialImportError(f"state dict key {key}: missing (the config describes it)")
        t = sd[key]
        want = tuple(s if s is not None else t.shape[0] for s in shape)
        if tuple(t.shape) != want:
            raise OfficialImportError(f"state dict key {key}: shape {list(t.shape)} does not match the config's "
                                      f"{list(want)}")
        out[name] = t.detach().to(torch.float32)
    emb = out["embedding.word_embeddings.weight"]
    if emb.shape[0] < config.vocab_size:
        raise OfficialImportError(f"state dict key sequential.0.word_embeddings.weight: {emb.shape[0]} rows, fewer "
                                  f"than the tokenizer's {config.vocab_size} tokens")
    out["embedding.word_embeddings.weight"] = emb[: config.vocab_size].contiguous()
    if not final_parametric:
        out["final_layernorm.weight"] = torch.ones(d)
        out["final_layernorm.bias"] = torch.zeros(d)
    return out


def import_official(input_path: str, config_path: str, save: str, tokenizer_type: Optional[str] = None,
                    vocab_file: Optional[str] = None, tokenizer_model: Optional[str] = None,
                    layout: Optional[Dict[str, int]] = None, log=print) -> str:
    """Convert an official checkpoint into a canonical checkpoint of this system at ``save``."""
    from megatron_tokenformer.data.tokenizer import build_tokenizer
    from megatron_tokenformer.interop.checkpoint_format import write_checkpoint

    # never written where read (an input inside --save, --save inside the input folder, ...)
    check_outputs_apart([("--save", save)], [("--input", input_path), ("--config", config_path),
                                             ("--vocab-file", vocab_file), ("--tokenizer-model", tokenizer_model)])
    neox = read_official_config(config_path)
    tokenizer, tok_file = None, None
    if tokenizer_type is not None:
        tokenizer = build_tokenizer(tokenizer_type, tokenizer_model=tokenizer_model, vocab_file=vocab_file)
        tok_file = getattr(tokenizer, "vocab_file", None) or getattr(tokenizer, "model_file", None)
    sd = read_official_state_dict(input_path)
    emb = sd.get("sequential.0.word_embeddings.weight")
    if emb is None:
        raise OfficialImportError("state dict key sequential.0.word_embeddings.weight: missing")
    vocab = tokenizer.vocab_size if tokenizer is not None else int(emb.shape[0])
    config, final_parametric = official_model_config(neox, vocab)
    layout = dict(layout or {})
    tp = layout.get("tensor_model_parallel_size", 1)
    pp = layout.get("pipeline_model_parallel_size", 1)
    layout.setdefault("tensor_model_parallel_size", tp)
    layout.setdefault("pipeline_model_parallel_size", pp)
    layout.setdefault("data_parallel_size", 1)
    try:
        config.resolve_taus().validate(tp, pp)
    except ValueError as exc:
        raise OfficialImportError(f"the target layout cannot hold this model: {exc}") from None
    tensors = convert_official_state_dict(sd, config, final_parametric)
    args = {"tokenizer_type": tokenizer_type or "NullTokenizer", "seq_length": config.seq_length,
            "num_layers": config.num_layers, "hidden_size": config.hidden_size,
            "num_attention_heads": config.num_attention_heads,
            "qkv_num_param_tokens": config.qkv_num_param_tokens,
            "proj_num_param_tokens": config.proj_num_param_tokens,
            "ffn_num_param_tokens": config.ffn_num_param_tokens,
            "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp}
    step = write_checkpoint(save, config, tensors, args, tokenizer_file=tok_file,
                            source={"format": "tokenformer-official", "input": os.path.abspath(input_path),
                                    "config": os.path.abspath(config_path)}, layout=layout)
    log(f"imported {input_path} ({config.num_layers} layers, d {config.hidden_size}, "
        f"{config.pattention_normalization}, "
        f"vocabulary {config.vocab_size}) into {step}")
    return step
