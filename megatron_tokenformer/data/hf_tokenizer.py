"""Hugging Face ``tokenizers`` behind Megatron's tokenizer interface, and byte-level BPE training.

``HFTokenizer(tokenizer.json)`` is what GPT-NeoX calls ``--tokenizer-type HFTokenizer --vocab-file
tokenizer.json`` and Megatron ``--tokenizer-type HuggingFaceTokenizer --tokenizer-model <file or
folder>``. The released Tokenformer models use the GPT-NeoX-20B ``tokenizer.json``:
``.eod`` = ``<|endoftext|>``, ``.pad`` = ``<|padding|>`` (or the eod id when absent).

Encoding is ``Tokenizer.encode(text).ids`` (as GPT-NeoX; the tokenizer's own post-processor
decides about special tokens), so a dataset made here equals the ecosystem's encoding + EOD.
``tokenizers`` is an optional dependency (the ``[hf]`` extra), imported when a tokenizer is built.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Iterator, List, Optional, Sequence

from megatron_tokenformer.data.tokenizer_base import TokenizerError

__all__ = ["HFTokenizer", "resolve_hf_tokenizer_file", "train_byte_level_bpe", "EOD_CANDIDATES"]

# end-of-document tokens looked up in this order
EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>")
PAD_CANDIDATES = ("<|padding|>", "<pad>", "[PAD]")


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise TokenizerError("the Hugging Face tokenizers need the `tokenizers` package: "
                             "pip install -e \".[hf]\"") from None
    return tokenizers


def resolve_hf_tokenizer_file(tokenizer_type: str, tokenizer_model: Optional[str],
                              vocab_file: Optional[str]) -> str:
    """The ``tokenizer.json`` the flags name (``--vocab-file`` or ``--tokenizer-model``, a file or a
    folder holding ``tokenizer.json``). Raises TokenizerError naming the flag."""
    if tokenizer_type == "HFTokenizer":
        flag, path = ("--vocab-file", vocab_file) if vocab_file is not None else ("--tokenizer-model", tokenizer_model)
    else:
        flag, path = ("--tokenizer-model", tokenizer_model) if tokenizer_model is not None else \
            ("--vocab-file", vocab_file)
    if path is None:
        need = "--vocab-file tokenizer.json" if tokenizer_type == "HFTokenizer" else \
            "--tokenizer-model (a tokenizer.json or a folder holding one)"
        raise TokenizerError(f"--tokenizer-type {tokenizer_type} needs {need}")
    if os.path.isdir(path):
        candidate = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(candidate):
            raise TokenizerError(f"{flag} {path}: the folder holds no tokenizer.json")
        return candidate
    if not os.path.isfile(path):
        raise TokenizerError(f"{flag} {path}: no such file")
    return path


class HFTokenizer:
    """A ``tokenizer.json`` (Hugging Face ``tokenizers``) behind Megatron's tokenizer interface."""

    def __init__(self, vocab_file: str):
        tokenizers = _import_tokenizers()
        if not os.path.isfile(vocab_file):
            raise TokenizerError(f"{vocab_file}: tokenizer.json not found")
        self.vocab_file = vocab_file
        try:
            self._tok = tokenizers.Tokenizer.from_file(vocab_file)
        except Exception as e:  # tokenizers raises its own Exception type
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TokenizerError(f"{vocab_file}: not a Hugging Face tokenizer.json ({msg})") from None
        self._eod = next((self._tok.token_to_id(t) for t in EOD_CANDIDATES
                          if self._tok.token_to_id(t) is not None), None)
        if self._eod is None:
            raise TokenizerError(f"{vocab_file}: the tokenizer has no end-of-document token (one of "
                                 f"{', '.join(EOD_CANDIDATES)})")
        self._pad = next((self._tok.token_to_id(t) for t in PAD_CANDIDATES
                          if self._tok.token_to_id(t) is not None), self._eod)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        return self._pad

    @property
    def eod_token(self) -> str:
        return self._tok.id_to_token(self._eod)

    @property
    def pad_token(self) -> str:
        return self._tok.id_to_token(self._pad)

    @property
    def tokenizers_object(self):
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    def tokenize(self, text: str) -> List[int]:
        return self._tok.encode(text).ids

    def tokenize_batch(self, texts: Sequence[str], append_eod: bool = False) -> List[List[int]]:
        tail = [self._eod] if append_eod else []
        return [e.ids + tail for e in self._tok.encode_batch(list(texts))]

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_piece(self, i: int) -> str:
        return self._tok.id_to_token(int(i))

    def __getstate__(self):
        return {"vocab_file": self.vocab_file}

    def __setstate__(self, state):
        self.__init__(state["vocab_file"])


def train_byte_level_bpe(texts: Iterator[str], output_file: str, vocab_size: int,
                         special_tokens: Sequence[str] = ("<|endoftext|>", "<|padding|>"),
                         min_frequency: int = 2) -> str:
    """Train a GPT-2/NeoX style byte-level BPE and write ``output_file`` (a ``tokenizer.json``).

    Every byte is in the initial alphabet, so no text is ever unknown and
    ``detokenize(tokenize(text)) == text``. ``special_tokens`` get ids 0, 1, ...; the first is the
    end-of-document token. The file is written to a temporary name and renamed.
    """
    tokenizers = _import_tokenizers()
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(special_tokens):
        raise ValueError(f"--vocab-size {vocab_size} is too small for a byte-level BPE (at least "
                         f"{len(alphabet) + len(special_tokens)}: 256 bytes + special tokens)")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=int(vocab_size), min_frequency=int(min_frequency),
                                  special_tokens=list(special_tokens), initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tmp = f"{output_file}.tmp-{os.getpid()}"
    try:
        tok.save(tmp)
        with open(tmp) as f:
            json.load(f)  # written completely
        os.replace(tmp, output_file)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return output_file
