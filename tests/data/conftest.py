"""Fixtures for the data pipeline tests: a generated corpus and a small sentencepiece model."""

import json
import os
import random

import pytest

WORDS = (
    "the of and to in is was for on that with as by at from his her it an were are which "
    "this be or have had not but what all when there can who been one more would their "
    "tokenformer pattention scaling parameter tokens attention layer model data pipeline "
    "über café naïve 東京 ☃ 3.14159 2024 x=y+1; {key: [value]}"
).split()


def make_documents(n_docs, seed=0, max_lines=4, max_words=14):
    """Random multi-line documents (no blank lines inside, no leading/trailing blanks)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        lines = []
        for _ in range(rng.randint(1, max_lines)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(1, max_words))]
            sep = rng.choice([" ", " ", " ", "  ", "\t"])
            lines.append(sep.join(words) + rng.choice([".", ",", "!", "", " "]))
        docs.append("\n".join(lines).strip())
    return docs


def write_blank_line_text(path, docs, blank="\n"):
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(d + "\n" + blank)


def write_jsonl(path, docs, key="text", extra=None):
    with open(path, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            obj = {key: d}
            if extra:
                obj.update(extra(i))
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory):
    """A 500-piece BPE sentencepiece model trained on generated text (identity normalisation)."""
    from megatron_tokenformer.data.tokenizer import train_sentencepiece

    d = tmp_path_factory.mktemp("tok")
    lines = [line for doc in make_documents(400, seed=123) for line in doc.split("\n")]
    return train_sentencepiece(iter(lines), str(d / "tok"), 500, num_threads=1)


@pytest.fixture
def corpus_docs():
    return make_documents(120, seed=7)


@pytest.fixture
def data_helpers():
    class H:
        make_documents = staticmethod(make_documents)
        write_blank_line_text = staticmethod(write_blank_line_text)
        write_jsonl = staticmethod(write_jsonl)

    return H
