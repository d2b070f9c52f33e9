"""Fixtures for the data pipeline tests: a generated corpus and a small sentencepiece model."""

import pytest

from tests.helpers.corpus_gen import make_documents


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory):
    """A 500-piece BPE sentencepiece model trained on generated text (identity normalisation)."""
    from megatron_tokenformer.data.tokenizer import train_sentencepiece

    d = tmp_path_factory.mktemp("tok")
    lines = [line for doc in make_documents(400, seed=123) for line in doc.split("\n")]
    return train_sentencepiece(iter(lines), str(d / "tok"), 500, num_threads=1)
