"""A sentencepiece model as a Hugging Face ``tokenizer.json`` that encodes exactly as sentencepiece.

transformers converts the ``.model`` file (its Llama converter: same pieces, scores, byte fallback);
the pre-tokenizer is then replaced by sentencepiece's own normalisation (prepend ``▁``, spaces ->
``▁``, no splitting), so runs of spaces and leading spaces encode as sentencepiece does, and no
BOS/EOS is added (as this project's datasets). Tested token-for-token against sentencepiece.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

__all__ = ["write_sentencepiece_as_hf"]


def write_sentencepiece_as_hf(model_file: str, out_dir: str, model_max_length: int) -> None:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` into ``out_dir``."""
    from tokenizers import decoders, normalizers
    from transformers import LlamaTokenizer

    from megatron_tokenformer.data.tokenizer import SentencePieceTokenizer

    sp = SentencePieceTokenizer(model_file)
    specials = {"eos_token": sp.id_to_piece(sp.eod), "pad_token": sp.id_to_piece(sp.pad)}
    if sp.bos >= 0:
        specials["bos_token"] = sp.id_to_piece(sp.bos)
    if sp.unk >= 0:
        specials["unk_token"] = sp.id_to_piece(sp.unk)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(model_file, os.path.join(tmp, "tokenizer.model"))
        with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
            json.dump(dict(specials, tokenizer_class="LlamaTokenizer", add_bos_token=False, add_eos_token=False,
                           legacy=False), f)
        backend = LlamaTokenizer.from_pretrained(tmp).backend_tokenizer
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(dict(specials, tokenizer_class="PreTrainedTokenizerFast", add_bos_token=False, add_eos_token=False,
                       clean_up_tokenization_spaces=False, model_max_length=int(model_max_length)), f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump(specials, f, indent=2)
