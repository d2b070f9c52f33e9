"""``--data-path P1 P2`` (Megatron's unweighted form: each dataset weighted by its size) trains, and the
blend the run consumes has the proportions Megatron's rule gives."""

import numpy as np
import pytest

from megatron_tokenformer.arguments import options_from_args, parse_args, validate_args
from megatron_tokenformer.data.indexed_dataset import IndexedDatasetBuilder
from megatron_tokenformer.data.tokenizer import build_tokenizer
from megatron_tokenformer.training import loop
from tests.helpers import train_runs

DOC_LEN = 32
DOCS = {"a": (1, 60), "b": (2, 20)}  # name: (the one token id its documents hold, number of documents)
ITERS, GBS = 20, 4


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("two_datasets")
    out = []
    for name, (token, n_docs) in DOCS.items():
        with IndexedDatasetBuilder(str(folder / name), dtype=np.uint16) as builder:
            for _ in range(n_docs):
                builder.add_document(np.full(DOC_LEN, token))
        out.append(str(folder / name))
    return out


def flags(prefixes, cache):
    return ["--num-layers", "1", "--hidden-size", "16", "--num-attention-heads", "2", "--seq-length", "16",
            "--micro-batch-size", str(GBS), "--train-iters", str(ITERS), "--lr", "1e-2", "--vocab-size", "8",
            "--data-path", *prefixes, "--split", "100,0,0", "--eval-iters", "0", "--log-interval", "1",
            "--data-cache-path", cache]


def test_unweighted_data_path_blends_by_size(prefixes, tmp_path):
    args = validate_args(parse_args(flags(prefixes, str(tmp_path / "cache"))), 1)
    train, valid, _ = loop.build_datasets(options_from_args(loop.DatasetOptions, args),
                                          build_tokenizer(args.tokenizer_type, None, args.vocab_size))
    assert valid is None and len(train) == ITERS * GBS
    source = np.array([int(train[i]["text"][0]) for i in range(len(train))])
    tokens = {token: n_docs * DOC_LEN for token, n_docs in DOCS.values()}
    share_a = tokens[1] / (tokens[1] + tokens[2])  # 0.75: weighted by size
    assert set(source.tolist()) == {1, 2}
    # the blend is low-discrepancy: within (1 + K * w) samples of the ideal count at every prefix
    assert abs(float(np.mean(source == 1)) - share_a) <= 3 / len(train)


@pytest.mark.slow
def test_unweighted_data_path_trains(prefixes, tmp_path):
    out = train_runs.check_ok(train_runs.run(train_runs.warm_launch(1, flags(prefixes, str(tmp_path / "cache"))),
                                             timeout=300))
    losses = [row["lm loss"] for row in train_runs.parse_iterations(out)]
    assert len(losses) == ITERS and all(np.isfinite(losses))
    # every document repeats one token: a model that sees the data learns to predict it
    assert np.mean(losses[-3:]) < losses[0] - 1.0, losses
