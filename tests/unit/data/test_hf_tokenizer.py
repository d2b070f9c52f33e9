"""Hugging Face tokenizers (data/hf_tokenizer.py): byte-level BPE training, datasets equal to the
``tokenizers`` library's own encoding + EOD, the flags' bad inputs."""

import random

import numpy as np
import pytest

pytest.importorskip("tokenizers")

from megatron_tokenformer.data.indexed_dataset import IndexedDataset  # noqa: E402
from megatron_tokenformer.data.tokenizer import TokenizerError, build_tokenizer, load_tokenizer_file  # noqa: E402
from tests.helpers.paths import load_tool  # noqa: E402

preprocess_data = load_tool("preprocess_data")
train_tokenizer = load_tool("train_tokenizer")


def _docs(seed=0, n=60):
    rng = random.Random(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa naïve café 2024 x+y=z".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 30))) for _ in range(n)]


@pytest.fixture(scope="module")
def tok_json(tmp_path_factory):
    d = tmp_path_factory.mktemp("hftok")
    (d / "corpus.txt").write_text("\n\n".join(_docs(1, 200)) + "\n")
    rc = train_tokenizer.main(["--tokenizer-type", "HFTokenizer", "--input", str(d / "corpus.txt"),
                               "--output-prefix", str(d / "tok"), "--vocab-size", "300"])
    assert rc == 0
    return str(d / "tok.json")


def test_trained_byte_level_bpe_round_trips_any_text(tok_json):
    tok = build_tokenizer("HFTokenizer", vocab_file=tok_json)
    assert tok.eod == 0 and tok.pad == 1 and tok.eod_token == "<|endoftext|>"
    assert 258 <= tok.vocab_size <= 300
    for text in ["alpha beta", "unseen ✓ text\twith\nnewlines  and  spaces", "中文 ünïcödé"]:
        assert tok.detokenize(tok.tokenize(text)) == text


def test_megatron_name_takes_file_or_folder(tok_json, tmp_path):
    import shutil
    shutil.copyfile(tok_json, tmp_path / "tokenizer.json")
    a = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path))
    b = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=tok_json)
    assert a.tokenize("gamma delta") == b.tokenize("gamma delta")
    assert type(load_tokenizer_file(str(tmp_path / "tokenizer.json"))).__name__ == "HFTokenizer"


def test_preprocess_equals_tokenizers_encoding_plus_eod(tok_json, tmp_path):
    import json

    from tokenizers import Tokenizer
    docs = _docs(2, 40)
    with open(tmp_path / "in.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    rc = preprocess_data.main(["--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "out"),
                               "--tokenizer-type", "HFTokenizer", "--vocab-file", tok_json, "--append-eod",
                               "--workers", "2"])
    assert rc == 0
    ref = Tokenizer.from_file(tok_json)
    eod = ref.token_to_id("<|endoftext|>")
    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    assert ds.num_documents == len(docs)
    for i, d in enumerate(docs):
        assert np.asarray(ds.get_document(i)).tolist() == ref.encode(d).ids + [eod]


@pytest.mark.parametrize("kwargs, needle", [
    (dict(tokenizer_type="HFTokenizer"), "--vocab-file"),
    (dict(tokenizer_type="HFTokenizer", vocab_file="/nonexistent/tok.json"), "--vocab-file /nonexistent"),
    (dict(tokenizer_type="HuggingFaceTokenizer", tokenizer_model="/tmp"), "no tokenizer.json"),
])
def test_bad_tokenizer_flags_name_the_flag(kwargs, needle):
    with pytest.raises(TokenizerError, match=needle.replace("+", r"\+")):
        build_tokenizer(**kwargs)


def test_not_a_tokenizer_json(tmp_path):
    bad = tmp_path / "tok.json"
    bad.write_text('{"hello": 1}')
    with pytest.raises(TokenizerError, match="not a Hugging Face tokenizer.json"):
        build_tokenizer("HFTokenizer", vocab_file=str(bad))


def test_tool_bad_vocab_file_one_line(tmp_path, capsys):
    (tmp_path / "in.txt").write_text("a b c\n")
    rc = preprocess_data.main(["--input", str(tmp_path / "in.txt"), "--output-prefix", str(tmp_path / "o"),
                               "--tokenizer-type", "HFTokenizer", "--vocab-file", str(tmp_path / "missing.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "--vocab-file" in err[0]
    assert not list(tmp_path.glob("o*"))


def test_train_tokenizer_too_small_vocab(tmp_path, capsys):
    (tmp_path / "in.txt").write_text("a b c\n")
    rc = train_tokenizer.main(["--tokenizer-type", "HFTokenizer", "--input", str(tmp_path / "in.txt"),
                               "--output-prefix", str(tmp_path / "t"), "--vocab-size", "100"])
    assert rc != 0 and "--vocab-size 100" in capsys.readouterr().err
    assert not list(tmp_path.glob("t*"))


def test_pretrain_flags_resolve_the_tokenizer_json(tok_json, tmp_path):
    from megatron_tokenformer.arguments import ArgumentError, parse_args, validate_args
    base = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
            "--micro-batch-size", "2", "--train-iters", "1", "--lr", "1e-3", "--mock-data"]
    args = validate_args(parse_args(base + ["--vocab-file", tok_json]), 1)  # GPT-NeoX spelling, type implied
    assert args.tokenizer_type == "HFTokenizer" and args.tokenizer_model == tok_json
    import shutil
    shutil.copyfile(tok_json, tmp_path / "tokenizer.json")
    args = validate_args(parse_args(base + ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                                            str(tmp_path)]), 1)  # Megatron spelling, a folder
    assert args.tokenizer_model == str(tmp_path / "tokenizer.json")
    with pytest.raises(ArgumentError, match="--vocab-file"):
        validate_args(parse_args(base + ["--tokenizer-type", "HFTokenizer"]), 1)


def test_vocabulary_padding_as_megatron(tok_json):
    from megatron_tokenformer.config import TokenformerConfig
    tok = build_tokenizer("HFTokenizer", vocab_file=tok_json)
    cfg = TokenformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1, seq_length=4,
                            vocab_size=tok.vocab_size, qkv_num_param_tokens=4, proj_num_param_tokens=4,
                            ffn_num_param_tokens=4)
    assert cfg.padded_vocab_size(1) == 384 and cfg.padded_vocab_size(2) == 512  # multiple of 128 x TP
