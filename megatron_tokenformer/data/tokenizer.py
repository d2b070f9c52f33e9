"""Tokenizers (Megatron names) and sentencepiece training.

``build_tokenizer("SentencePieceTokenizer", tokenizer_model=PATH)``,
``build_tokenizer("HFTokenizer", vocab_file=tokenizer.json)`` (GPT-NeoX's name),
``build_tokenizer("HuggingFaceTokenizer", tokenizer_model=tokenizer.json or a folder holding one)``
(Megatron's name; both are :class:`~megatron_tokenformer.data.hf_tokenizer.HFTokenizer`, through the
``tokenizers`` library) or ``build_tokenizer("NullTokenizer", vocab_size=V)`` return a
:class:`~megatron_tokenformer.data.tokenizer_base.Tokenizer`: ``.vocab_size .eod .pad
.tokenize(text) -> list[int] .tokenize_batch(texts) .detokenize(ids) -> str``.

Special tokens of a model trained by :func:`train_sentencepiece` (and ``tools/train_tokenizer.py``):

    id 0 ``<unk>``   id 1 ``<s>`` (bos)   id 2 ``</s>`` (eos = end of document, ``.eod``)
    id 3 ``<pad>`` (``.pad``)

They are control symbols: text never encodes to them and decoding drops them. A
sentencepiece model from elsewhere (e.g. Llama's) works too: ``.eod`` is its eos id and
``.pad`` its pad id, or the eos id when it has none.
"""

from __future__ import annotations

import os
import re
from typing import Iterable, Iterator, List, Optional, Sequence

from megatron_tokenformer.data.tokenizer_base import Tokenizer, TokenizerError

__all__ = [
    "Tokenizer",
    "TokenizerError",
    "SentencePieceTokenizer",
    "NullTokenizer",
    "build_tokenizer",
    "load_tokenizer_file",
    "train_sentencepiece",
    "TOKENIZER_TYPES",
]

TOKENIZER_TYPES = ("SentencePieceTokenizer", "HFTokenizer", "HuggingFaceTokenizer", "NullTokenizer")
HF_TOKENIZER_TYPES = ("HFTokenizer", "HuggingFaceTokenizer")


class SentencePieceTokenizer:
    """A sentencepiece model file behind Megatron's tokenizer interface."""

    def __init__(self, model_file: str, num_threads: int = 1):
        import sentencepiece as spm

        if model_file is None:
            raise TokenizerError("SentencePieceTokenizer needs --tokenizer-model (a .model file)")
        if not os.path.isfile(model_file):
            raise TokenizerError(f"{model_file}: tokenizer model not found")
        self.model_file = model_file
        self.num_threads = num_threads
        proto = open(model_file, "rb").read()
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(proto)
        except Exception as e:  # sentencepiece raises RuntimeError / OSError
            raise TokenizerError(
                f"{model_file}: not a sentencepiece model ({str(e).strip() or type(e).__name__})"
            ) from None
        if self._sp.GetPieceSize() <= 0:
            raise TokenizerError(f"{model_file}: not a sentencepiece model (empty vocabulary)")
        self._eod = self._sp.eos_id()
        if self._eod < 0:
            raise TokenizerError(
                f"{model_file}: the sentencepiece model has no end-of-sentence piece to use as "
                "end-of-document"
            )
        pad = self._sp.pad_id()
        self._pad = pad if pad >= 0 else self._eod

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        return self._pad

    @property
    def bos(self) -> int:
        return self._sp.bos_id()

    @property
    def unk(self) -> int:
        return self._sp.unk_id()

    def tokenize(self, text: str) -> List[int]:
        return self._sp.EncodeAsIds(text)

    def tokenize_batch(self, texts: Sequence[str], append_eod: bool = False) -> List[List[int]]:
        """Encode many texts in one call (``num_threads`` sentencepiece threads); with
        ``append_eod`` each document ends with ``eod``."""
        return self._sp.Encode(list(texts), out_type=int, num_threads=self.num_threads,
                               add_bos=False, add_eos=append_eod)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.IdToPiece(int(i))

    def __getstate__(self):
        return {"model_file": self.model_file, "num_threads": self.num_threads}

    def __setstate__(self, state):
        self.__init__(state["model_file"], state["num_threads"])


class NullTokenizer:
    """Megatron's NullTokenizer: text is whitespace-separated integer ids.

    ``--vocab-size V`` gives ids 0..V-1 for text; the end-of-document id is V, so
    ``vocab_size`` is V + 1 (as Megatron). ``pad`` is the eod id.
    """

    def __init__(self, vocab_size: int):
        if vocab_size is None or int(vocab_size) <= 0:
            raise TokenizerError("NullTokenizer needs --vocab-size > 0")
        self._text_vocab = int(vocab_size)

    @property
    def vocab_size(self) -> int:
        return self._text_vocab + 1

    @property
    def eod(self) -> int:
        return self._text_vocab

    @property
    def pad(self) -> int:
        return self._text_vocab

    def tokenize(self, text: str) -> List[int]:
        ids = [int(t) for t in text.split()]
        for i in ids:
            if not 0 <= i < self._text_vocab:
                raise ValueError(f"NullTokenizer: id {i} outside [0, {self._text_vocab})")
        return ids

    def tokenize_batch(self, texts: Sequence[str], append_eod: bool = False) -> List[List[int]]:
        tail = [self.eod] if append_eod else []
        return [self.tokenize(t) + tail for t in texts]

    def detokenize(self, ids: Iterable[int]) -> str:
        return " ".join(str(int(i)) for i in ids)


def build_tokenizer(tokenizer_type: str, tokenizer_model: Optional[str] = None,
                    vocab_size: Optional[int] = None, num_threads: int = 1,
                    vocab_file: Optional[str] = None) -> Tokenizer:
    """Megatron-style factory. Raises ``TokenizerError`` naming the flag or the file."""
    if tokenizer_type in HF_TOKENIZER_TYPES:
        from megatron_tokenformer.data.hf_tokenizer import HFTokenizer, resolve_hf_tokenizer_file
        return HFTokenizer(resolve_hf_tokenizer_file(tokenizer_type, tokenizer_model, vocab_file))
    if tokenizer_type == "SentencePieceTokenizer":
        if tokenizer_model is None:
            raise TokenizerError("--tokenizer-type SentencePieceTokenizer needs --tokenizer-model")
        return SentencePieceTokenizer(tokenizer_model, num_threads=num_threads)
    if tokenizer_type == "NullTokenizer":
        if vocab_size is None:
            raise TokenizerError("--tokenizer-type NullTokenizer needs --vocab-size")
        return NullTokenizer(vocab_size)
    raise TokenizerError(
        f"unknown --tokenizer-type {tokenizer_type!r}; choose one of {', '.join(TOKENIZER_TYPES)}"
    )


def load_tokenizer_file(path: str) -> Tokenizer:
    """The tokenizer a checkpoint stores (``tokenizer.model``): a Hugging Face ``tokenizer.json``
    (JSON) or a sentencepiece model (protobuf), told apart by the file's content."""
    return build_tokenizer(tokenizer_file_type(path), tokenizer_model=path)


def tokenizer_file_type(path: str) -> str:
    """"HuggingFaceTokenizer" when ``path`` holds JSON, else "SentencePieceTokenizer"."""
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    return "HuggingFaceTokenizer" if head.startswith(b"{") else "SentencePieceTokenizer"


def train_sentencepiece(
    sentences: Iterator[str],
    model_prefix: str,
    vocab_size: int,
    model_type: str = "bpe",
    input_sentence_size: int = 0,
    character_coverage: float = 1.0,
    normalization_rule_name: str = "identity",
    remove_extra_whitespaces: bool = False,
    user_defined_symbols: Sequence[str] = (),
    max_sentence_length: int = 16384,
    num_threads: Optional[int] = None,
    seed_sentencepiece_size: int = 1000000,
    logstream=None,
) -> str:
    """Train a sentencepiece model from an iterator of lines; returns ``PREFIX.model``.

    Byte fallback is on (no text is ever ``<unk>``), ids 0-3 are ``<unk> <s> </s> <pad>``.
    With the default ``identity`` normalisation and ``remove_extra_whitespaces=False``,
    ``detokenize(tokenize(text)) == text`` for any text. ``input_sentence_size > 0`` samples
    that many lines (reservoir sampling inside sentencepiece) instead of using all.
    """
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"--model-type must be bpe or unigram, got {model_type!r}")
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    kwargs = dict(
        sentence_iterator=sentences,
        model_prefix=model_prefix,
        vocab_size=int(vocab_size),
        model_type=model_type,
        byte_fallback=True,
        character_coverage=character_coverage,
        normalization_rule_name=normalization_rule_name,
        remove_extra_whitespaces=remove_extra_whitespaces,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
        pad_piece="<pad>",
        input_sentence_size=int(input_sentence_size),
        shuffle_input_sentence=True,
        max_sentence_length=int(max_sentence_length),
        allow_whitespace_only_pieces=True,
        split_digits=True,
        num_threads=num_threads or os.cpu_count() or 1,
        seed_sentencepiece_size=int(seed_sentencepiece_size),
        minloglevel=2,  # errors still raise; silences per-piece warnings
    )
    if user_defined_symbols:
        kwargs["user_defined_symbols"] = list(user_defined_symbols)
    try:
        if logstream is not None:
            spm.SentencePieceTrainer.Train(logstream=logstream, **kwargs)
        else:
            spm.SentencePieceTrainer.Train(**kwargs)
    except RuntimeError as e:
        m = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", str(e))
        if m:
            raise ValueError(
                f"--vocab-size {m.group(1)} is too large for this corpus (at most {m.group(2)}); "
                "use a smaller --vocab-size or more text"
            ) from None
        m = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", str(e))
        if m:
            raise ValueError(
                f"--vocab-size {m.group(1)} is too small: this corpus needs at least {m.group(2)} "
                "(special tokens, 256 byte pieces and every character kept by --character-coverage)"
            ) from None
        raise
    return model_prefix + ".model"
