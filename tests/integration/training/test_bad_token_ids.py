"""A .bin holding a token id beyond the vocabulary, under a .meta.json that says it does not (so the start-up
check passes): every rank ends with the same one line naming the .bin and the document, exit 2, no traceback,
no rank left -- at TP 1 (two data-parallel ranks: the rank that did not see it must not hang) and at TP 2
(where the vocabulary-parallel embedding used to train on it silently)."""

import json
import re

import numpy as np
import pytest

from megatron_tokenformer.data.indexed_dataset import IndexedDatasetBuilder, meta_file_path
from tests.helpers import ops_checks as C
from tests.helpers import train_runs

pytestmark = pytest.mark.slow

BAD_DOCUMENT, BAD_OFFSET, BAD_ID = 3, 5, 150   # the NullTokenizer of --vocab-size 100 has 101 ids


@pytest.fixture(scope="module")
def lying_corpus(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("bad_ids") / "corpus_text_document")
    rng = np.random.default_rng(0)
    with IndexedDatasetBuilder(prefix, dtype=np.uint16) as b:
        for d in range(10):
            doc = rng.integers(0, 100, 40)
            if d == BAD_DOCUMENT:
                doc[BAD_OFFSET] = BAD_ID
            b.add_document(doc)
    with open(meta_file_path(prefix)) as f:
        meta = json.load(f)
    assert meta["max_token_id"] == BAD_ID
    meta["max_token_id"] = 99                  # the sidecar lies: the start-up vocabulary check passes
    with open(meta_file_path(prefix), "w") as f:
        json.dump(meta, f)
    return prefix


@pytest.mark.parametrize("tp", [1, 2], ids=["tp1-dp2", "tp2"])
def test_out_of_vocabulary_id_ends_every_rank_with_one_line(lying_corpus, tmp_path, tp):
    # 10 documents x 40 tokens = 25 samples of 16 per epoch: 8 iterations of 4 samples read every token
    args = train_runs.TINY_MODEL + train_runs.layout_args(tp, 1) + [
        "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3", "--tokenizer-type", "NullTokenizer",
        "--vocab-size", "100", "--data-path", lying_corpus, "--split", "100,0,0", "--data-cache-path",
        str(tmp_path / "cache"), "--log-interval", "4", "--eval-iters", "0", "--seed", "7", "--train-iters", "8",
        "--save", str(tmp_path / "ckpt"), "--save-interval", "4", "--distributed-timeout-minutes", "1"]
    p = train_runs.start(train_runs.torchrun(2, args))
    pids = [p.pid] + [r.pid for r in C.rank_processes(p.pid, 2)]
    r = train_runs.finish(p, timeout=300)
    C.wait_gone(pids, 30)
    assert r.returncode != 0, r.stdout[-3000:]
    line = C.assert_one_error_line(r.stdout, count=2, torchrun=True)
    assert C.error_lines(r.stdout) == [line, line]                      # the same line on both ranks
    assert line.startswith(f"pretrain_tokenformer.py: error: {lying_corpus}.bin: document {BAD_DOCUMENT} holds "
                           f"token id {BAD_ID} (its token {BAD_OFFSET}), which does not fit the model's vocabulary "
                           "of 101 (found in a training batch on rank "), line
    # each rank exits 2 -- or, when the other exited first, torchrun's SIGTERM ends it after its line was out
    exits = dict(re.findall(r"rank\s+: (\d+) \(local_rank: \d+\)\s+exitcode\s+: (-?\d+)", r.stdout))
    assert sorted(exits) == ["0", "1"] and set(exits.values()) <= {"2", "-15"} and "2" in exits.values(), exits
    # nothing trained on it was logged or saved
    assert " iteration        4/" not in r.stdout and C.step_names(str(tmp_path / "ckpt")) == []
