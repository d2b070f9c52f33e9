"""The tokenizer protocol (data/tokenizer_base.py): the three tokenizers implement it and keep its
contract; one error type whichever module it is imported from."""

import pytest

from megatron_tokenformer.data import hf_tokenizer, tokenizer
from megatron_tokenformer.data.tokenizer_base import Tokenizer, TokenizerError

TEXTS = ["alpha beta gamma", "", "delta epsilon alpha alpha"]


@pytest.fixture(scope="module")
def three_tokenizers(sp_model, tmp_path_factory):
    pytest.importorskip("tokenizers")
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    texts = [" ".join(words[(i * 3 + j) % len(words)] for j in range(8)) for i in range(40)]
    tok_json = hf_tokenizer.train_byte_level_bpe(iter(texts), str(tmp_path_factory.mktemp("hf") / "tok.json"), 300)
    return {"SentencePieceTokenizer": tokenizer.build_tokenizer("SentencePieceTokenizer", tokenizer_model=sp_model),
            "HuggingFaceTokenizer": tokenizer.build_tokenizer("HuggingFaceTokenizer", tokenizer_model=tok_json),
            "NullTokenizer": tokenizer.build_tokenizer("NullTokenizer", vocab_size=50)}


@pytest.mark.parametrize("kind", ["SentencePieceTokenizer", "HuggingFaceTokenizer", "NullTokenizer"])
def test_each_tokenizer_keeps_the_protocol(three_tokenizers, kind):
    tok = three_tokenizers[kind]
    assert isinstance(tok, Tokenizer)
    texts = ["3 7 11", "", "0 49"] if kind == "NullTokenizer" else TEXTS
    assert 0 <= tok.eod < tok.vocab_size and 0 <= tok.pad < tok.vocab_size
    singles = [tok.tokenize(t) for t in texts]
    assert tok.tokenize_batch(texts) == singles
    assert tok.tokenize_batch(texts, append_eod=True) == [ids + [tok.eod] for ids in singles]
    for text, ids in zip(texts, singles):
        assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
        assert tok.detokenize(ids) == text


def test_an_object_without_the_members_is_no_tokenizer():
    class HalfTokenizer:
        vocab_size, eod, pad = 10, 9, 9

        def tokenize(self, text):
            return []

    assert not isinstance(HalfTokenizer(), Tokenizer)


def test_one_error_type_from_every_module():
    assert tokenizer.TokenizerError is TokenizerError
    assert hf_tokenizer.TokenizerError is TokenizerError
    from megatron_tokenformer.data import Tokenizer as package_protocol
    from megatron_tokenformer.data import TokenizerError as package_error
    assert package_error is TokenizerError and package_protocol is Tokenizer
    with pytest.raises(TokenizerError, match="--vocab-size"):
        tokenizer.build_tokenizer("NullTokenizer")
    with pytest.raises(TokenizerError, match="--tokenizer-model"):
        tokenizer.build_tokenizer("HuggingFaceTokenizer")
