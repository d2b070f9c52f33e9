"""Tokenizers: special ids, exact round trip, bad model files, NullTokenizer."""

import pytest

from megatron_tokenformer.data.tokenizer import (
    NullTokenizer,
    SentencePieceTokenizer,
    TokenizerError,
    build_tokenizer,
    train_sentencepiece,
)
from tests.helpers.corpus_gen import make_documents


def test_special_tokens_and_exact_round_trip(sp_model):
    tok = build_tokenizer("SentencePieceTokenizer", sp_model)
    assert tok.vocab_size == 500
    assert (tok.unk, tok.bos, tok.eod, tok.pad) == (0, 1, 2, 3)
    assert [tok.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    # identity normalisation + byte fallback: any text round-trips exactly, including
    # characters never seen in training, tabs, newlines, runs of spaces, leading spaces
    texts = ["  leading and  double  spaces\tand tabs\nnew line ", "Ωμέγα ∑ 😀 — ﬁ ①", "x"]
    for t in texts:
        ids = tok.tokenize(t)
        assert tok.unk not in ids and tok.eod not in ids
        assert tok.detokenize(ids) == t
    batch = tok.tokenize_batch(texts, append_eod=True)
    assert [b[:-1] for b in batch] == [tok.tokenize(t) for t in texts]
    assert all(b[-1] == tok.eod for b in batch)
    # control symbols are dropped on decode
    assert tok.detokenize(tok.tokenize("ab") + [tok.eod, tok.pad]) == "ab"


def test_nfkc_model_normalises_as_documented(tmp_path):
    """With --normalization-rule-name nmt_nfkc and --remove-extra-whitespaces the round trip
    holds up to NFKC + whitespace collapsing: detokenize(tokenize(t)) == ' '.join(t.split())
    for text without compatibility characters."""
    lines = [line for d in make_documents(200, seed=5) for line in d.split("\n")]
    model = train_sentencepiece(iter(lines), str(tmp_path / "nfkc"), 340, model_type="unigram",
                                normalization_rule_name="nmt_nfkc", remove_extra_whitespaces=True,
                                num_threads=1)
    tok = SentencePieceTokenizer(model)
    for d in make_documents(20, seed=9):
        assert tok.detokenize(tok.tokenize(d)) == " ".join(d.split())


def test_bad_tokenizer_models(tmp_path):
    with pytest.raises(TokenizerError, match=r"missing\.model: tokenizer model not found"):
        build_tokenizer("SentencePieceTokenizer", str(tmp_path / "missing.model"))
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"this is not a protobuf \x00\xff" * 10)
    with pytest.raises(TokenizerError, match=r"junk\.model: not a sentencepiece model"):
        build_tokenizer("SentencePieceTokenizer", str(junk))
    empty = tmp_path / "empty.model"
    empty.write_bytes(b"")
    with pytest.raises(TokenizerError, match=r"empty\.model: not a sentencepiece model"):
        build_tokenizer("SentencePieceTokenizer", str(empty))
    with pytest.raises(TokenizerError, match="--tokenizer-model"):
        build_tokenizer("SentencePieceTokenizer", None)
    with pytest.raises(TokenizerError, match="unknown --tokenizer-type 'GPT2BPE'"):
        build_tokenizer("GPT2BPE", None)


def test_null_tokenizer():
    tok = build_tokenizer("NullTokenizer", vocab_size=100)
    assert isinstance(tok, NullTokenizer)
    assert tok.vocab_size == 101 and tok.eod == 100 and tok.pad == 100
    assert tok.tokenize("5 7 99") == [5, 7, 99]
    assert tok.detokenize([5, 7]) == "5 7"
    assert tok.tokenize_batch(["1 2", "3"], append_eod=True) == [[1, 2, 100], [3, 100]]
    with pytest.raises(ValueError, match=r"id 100 outside \[0, 100\)"):
        tok.tokenize("100")
    with pytest.raises(TokenizerError, match="--vocab-size"):
        build_tokenizer("NullTokenizer")
