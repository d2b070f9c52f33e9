"""What every tokenizer is: the :class:`Tokenizer` protocol and the one error type, below the tokenizers.

The three tokenizers implement the protocol (Megatron's tokenizer interface):
:class:`~megatron_tokenformer.data.tokenizer.SentencePieceTokenizer`,
:class:`~megatron_tokenformer.data.hf_tokenizer.HFTokenizer` and
:class:`~megatron_tokenformer.data.tokenizer.NullTokenizer`. ``data/tokenizer.py`` (the factory) imports
``data/hf_tokenizer.py``; both import this module, so neither imports the other for the error type.
"""

from __future__ import annotations

from typing import Iterable, List, Protocol, Sequence, runtime_checkable

from megatron_tokenformer.errors import TokenformerError

__all__ = ["Tokenizer", "TokenizerError"]


class TokenizerError(TokenformerError, ValueError):
    """A tokenizer that cannot be built; the message names the file or flag."""


@runtime_checkable
class Tokenizer(Protocol):
    """Text <-> token ids.

    ``vocab_size``: ids are in [0, vocab_size). ``eod``: the end-of-document id (appended after every
    document of a dataset; generation stops at it). ``pad``: the padding id (``eod`` when the
    tokenizer has none). ``tokenize(text) -> [ids]``; ``tokenize_batch(texts, append_eod)`` -> one id
    list per text (each ending with ``eod`` when ``append_eod``); ``detokenize(ids) -> text``.
    """

    @property
    def vocab_size(self) -> int: ...

    @property
    def eod(self) -> int: ...

    @property
    def pad(self) -> int: ...

    def tokenize(self, text: str) -> List[int]: ...

    def tokenize_batch(self, texts: Sequence[str], append_eod: bool = False) -> List[List[int]]: ...

    def detokenize(self, ids: Iterable[int]) -> str: ...
