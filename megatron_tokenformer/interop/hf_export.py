"""Export a checkpoint (any TP/PP/DP layout, either model type) to a Hugging Face model folder.

    HF_DIR/config.json                     TokenformerConfig + auto_map (trust_remote_code)
    HF_DIR/configuration_tokenformer.py    self-contained (torch + transformers only)
    HF_DIR/modeling_tokenformer.py
    HF_DIR/model.safetensors               or model-0000i-of-0000n.safetensors + model.safetensors.index.json
    HF_DIR/generation_config.json
    HF_DIR/tokenizer.json + tokenizer_config.json + special_tokens_map.json   (when the checkpoint has a
                                                                            Hugging Face tokenizer)

Tensor names are ``model.`` + the canonical names; the vocabulary padding is trimmed (the HF
model's vocabulary is the tokenizer's). Written into ``HF_DIR.partial-<pid>``, fsynced and renamed
(:func:`megatron_tokenformer.fileio.replace_dir`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Callable, Dict, List, Optional

import torch

from megatron_tokenformer.errors import TokenformerError
from megatron_tokenformer.fileio import check_outputs_apart, replace_dir
from megatron_tokenformer.interop.checkpoint_format import TOKENIZER_FILE, open_step
from megatron_tokenformer.interop.hf import HF_DIR, REMOTE_CODE_FILES

__all__ = ["ExportError", "export_hf", "hf_config_dict", "HF_PREFIX", "DTYPES", "parse_size"]

HF_PREFIX = "model."
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


class ExportError(TokenformerError, ValueError):
    """Bad request; the message names the flag or file; nothing was written."""


def parse_size(text: str) -> int:
    """'5GB', '500MB', '100KB', '1234' -> bytes (decimal units, as transformers' max_shard_size)."""
    t = str(text).strip().upper()
    for unit, mult in (("GIB", 1 << 30), ("MIB", 1 << 20), ("KIB", 1 << 10), ("GB", 10 ** 9), ("MB", 10 ** 6),
                       ("KB", 10 ** 3), ("B", 1)):
        if t.endswith(unit):
            t, m = t[: -len(unit)], mult
            break
    else:
        m = 1
    try:
        value = int(float(t) * m)
    except ValueError:
        raise ExportError(f"--max-shard-size {text!r}: expected a size such as 2GB, 500MB or 1000000") from None
    if value <= 0:
        raise ExportError(f"--max-shard-size {text!r} must be positive")
    return value


def hf_config_dict(config, dtype: str, eod: Optional[int], pad: Optional[int]) -> Dict[str, object]:
    """config.json content for a model config of this system."""
    cfg = config
    return {
        "architectures": ["TokenformerForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_tokenformer.TokenformerConfig",
                     "AutoModelForCausalLM": "modeling_tokenformer.TokenformerForCausalLM"},
        "model_type": "megatron_tokenformer",
        "architecture": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "max_position_embeddings": cfg.max_position_embeddings,
        "qkv_num_param_tokens": cfg.qkv_num_param_tokens,
        "proj_num_param_tokens": cfg.proj_num_param_tokens,
        "ffn_num_param_tokens": cfg.ffn_num_param_tokens,
        "qkv_tau": cfg.qkv_tau,
        "proj_tau": cfg.proj_tau,
        "ffn_tau": cfg.ffn_tau,
        "pattention_normalization": cfg.pattention_normalization,
        "norm_epsilon_pattention": cfg.norm_epsilon_pattention,
        "rotary_dim": cfg.rotary_dim,
        "rotary_base": cfg.rotary_base,
        "block_layernorm": cfg.block_layernorm,
        "layernorm_epsilon": cfg.layernorm_epsilon,
        "ffn_hidden_size": cfg.ffn_hidden_size if cfg.model_type == "transformer" else None,
        "tie_word_embeddings": False,  # tied inside the model (logits = h @ embeddingᵀ): no lm_head tensor
        "bos_token_id": eod,
        "eos_token_id": eod,
        "pad_token_id": pad,
        "torch_dtype": dtype,
        "use_cache": True,
        "megatron_tokenformer_config": config.to_dict(),
    }


def _shards(tensors: Dict[str, torch.Tensor], max_bytes: int) -> List[List[str]]:
    shards, current, size = [], [], 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if current and size + n > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += n
    if current:
        shards.append(current)
    return shards


def _write_tokenizer(step_dir: str, out: str, seq_length: int, log) -> Optional[Dict[str, object]]:
    """Copy the checkpoint's tokenizer for AutoTokenizer; returns {eod, pad} ids or None."""
    path = os.path.join(step_dir, TOKENIZER_FILE)
    if not os.path.isfile(path):
        log("note: the checkpoint stores no tokenizer; the export has none (AutoTokenizer needs one)")
        return None
    from megatron_tokenformer.data.tokenizer import load_tokenizer_file, tokenizer_file_type

    tok = load_tokenizer_file(path)
    if tokenizer_file_type(path) == "HuggingFaceTokenizer":
        shutil.copyfile(path, os.path.join(out, "tokenizer.json"))
        eos, pad = tok.eod_token, tok.pad_token
        with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": eos,
                       "unk_token": eos, "pad_token": pad, "add_bos_token": False, "add_eos_token": False,
                       "clean_up_tokenization_spaces": False, "model_max_length": int(seq_length)}, f, indent=2)
        with open(os.path.join(out, "special_tokens_map.json"), "w") as f:
            json.dump({"eos_token": eos, "bos_token": eos, "unk_token": eos, "pad_token": pad}, f, indent=2)
    else:
        from megatron_tokenformer.interop.sp_convert import write_sentencepiece_as_hf
        write_sentencepiece_as_hf(path, out, int(seq_length))
    return {"eod": tok.eod, "pad": tok.pad}


def export_hf(load: str, save: str, iteration: Optional[int] = None, dtype: str = "float32",
              max_shard_size: str = "5GB", overwrite: bool = False, log: Callable[[str], None] = print) -> str:
    """Write the Hugging Face folder ``save`` from checkpoint ``load``; returns ``save``."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    max_bytes = parse_size(max_shard_size)
    check_outputs_apart([("--save", save)], [("--load", load)])  # never delete or write into what is read
    save = os.path.abspath(save)
    if os.path.exists(save) and (not os.path.isdir(save) or (os.listdir(save) and not overwrite)):
        raise ExportError(f"--save {save} exists and is not empty (pass --overwrite to replace it)")
    try:
        view = open_step(load, iteration)
    except (FileNotFoundError, ValueError) as exc:
        raise ExportError(str(exc)) from None
    with contextlib.closing(view), replace_dir(save) as staging:
        config = view.config
        tensors = {HF_PREFIX + name: view.read(name).to(DTYPES[dtype]).contiguous() for name in view.params}
        ids = _write_tokenizer(view.step_dir, staging, config.seq_length, log)
        shards = _shards(tensors, max_bytes)
        meta = {"format": "pt", "exported_by": "megatron_tokenformer", "source": view.step_dir}
        if len(shards) == 1:
            save_file(tensors, os.path.join(staging, SAFETENSORS_FILE), metadata=meta)
        else:
            weight_map = {}
            for i, names in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file({n: tensors[n] for n in names}, os.path.join(staging, fname), metadata=meta)
                weight_map.update({n: fname for n in names})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            with open(os.path.join(staging, SAFETENSORS_INDEX), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
        eod = ids["eod"] if ids else None
        pad = ids["pad"] if ids else None
        with open(os.path.join(staging, "config.json"), "w") as f:
            json.dump(hf_config_dict(config, dtype, eod, pad), f, indent=2, sort_keys=True)
        # only what generation needs from us (the special ids): a max_length here would make transformers
        # warn on every generate(max_new_tokens=...), and sampling defaults are transformers' own
        gen = {"_from_model_config": False}
        if ids:
            gen.update(bos_token_id=eod, eos_token_id=eod, pad_token_id=pad)
        with open(os.path.join(staging, "generation_config.json"), "w") as f:
            json.dump(gen, f, indent=2, sort_keys=True)
        for name in REMOTE_CODE_FILES:
            shutil.copyfile(os.path.join(HF_DIR, name), os.path.join(staging, name))
    log(f"exported {view.step_dir} ({config.model_type}, {len(tensors)} tensors, {dtype}, "
        f"{len(shards)} safetensors file{'s' if len(shards) > 1 else ''}) to {save}")
    return save
