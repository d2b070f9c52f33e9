"""training/data_checks.py: a batch id outside the vocabulary is found on the host, never reaches the model,
and ends every rank with the same line (naming the .bin and the document) at the next agreement point."""


import numpy as np
import pytest
import torch

from megatron_tokenformer.config import TokenformerConfig
from megatron_tokenformer.data.batch_check import TokenIdError
from megatron_tokenformer.data.gpt_dataset import GPTDataset
from megatron_tokenformer.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatron_tokenformer.training import data_checks, loop
from tests.helpers import dist_pool

VOCAB = 50


@pytest.fixture(autouse=True)
def _fresh():
    data_checks.reset()
    yield
    data_checks.reset()


def _dataset(tmp_path, bad_document=4, bad_offset=3, bad_id=VOCAB + 7):
    """8 documents of 10 ids in [0, VOCAB), one id of one document outside it."""
    rng = np.random.default_rng(1)
    with IndexedDatasetBuilder(str(tmp_path / "bad"), dtype=np.int32) as b:
        for d in range(8):
            doc = rng.integers(0, VOCAB, 10)
            if d == bad_document:
                doc[bad_offset] = bad_id
            b.add_document(doc)
    return GPTDataset(IndexedDataset(str(tmp_path / "bad")), "train", (0, 8), 40, 8, seed=2,
                      cache_dir=str(tmp_path / "cache"))


def test_check_batch_replaces_records_and_agree_raises(tmp_path):
    ds = _dataset(tmp_path)
    bad = next(i for i in range(len(ds)) if int(ds[i]["text"].max()) >= VOCAB)
    good = next(i for i in range(len(ds)) if int(ds[i]["text"].max()) < VOCAB)
    batch = torch.utils.data.default_collate([ds[good], ds[bad]])
    original = batch["text"].clone()
    text = data_checks.check_batch(batch, ds, VOCAB, "training")
    outside = (original < 0) | (original >= VOCAB)
    assert outside.sum() >= 1
    assert torch.equal(text, original.masked_fill(outside, 0))        # only the bad ids changed, to 0
    line = data_checks.pending()
    assert line.startswith(f"{ds.indexed_dataset.bin_path}: document 4 holds token id {VOCAB + 7} (its token 3), "
                           f"which does not fit the model's vocabulary of {VOCAB} (found in a training batch on rank 0")
    data_checks.check_batch(torch.utils.data.default_collate([ds[bad]]), ds, VOCAB, "training")
    assert data_checks.pending() == line                                 # the first one is kept
    with pytest.raises(TokenIdError) as info:
        data_checks.agree()
    assert str(info.value) == line
    data_checks.reset()
    data_checks.agree()                                                  # nothing pending: nothing raised


class RecordingEngine(torch.nn.Module):
    """Stands in for DeepSpeed's engine; remembers the largest id it was given."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.lr_scheduler, self.skipped_steps, self.steps, self.max_seen = None, 0, 0, -1

    def forward(self, tokens, labels, loss_mask):
        self.max_seen = max(self.max_seen, int(tokens.max()), int(labels.max()))
        return (self.weight * tokens.float().mean()) ** 2

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.steps += 1

    def get_global_grad_norm(self):
        return 1.0


def test_the_loop_stops_before_logging_and_the_model_never_sees_the_id(tmp_path, capsys):
    ds = _dataset(tmp_path)
    args = loop.TrainingOptions(global_batch_size=2, micro_batch_size=2, gradient_accumulation_steps=1, seq_length=8,
                                train_iters=20, log_interval=5, eval_interval=1000, eval_iters=0, save=None,
                                save_interval=None, exit_interval=None, exit_duration_in_mins=None, peak_tflops=None,
                                bf16=False, fp16=False, lr=1e-3, tensor_model_parallel_size=1, num_workers=0,
                                check_for_nan_in_loss_and_grad=True, max_skipped_iterations=100)
    cfg = TokenformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, seq_length=8, vocab_size=VOCAB,
                            qkv_num_param_tokens=4, proj_num_param_tokens=4, ffn_num_param_tokens=8)
    # the iteration whose batch holds the bad id (samples are served in order: 2 per iteration)
    first_bad = next(i for i in range(len(ds)) if int(ds[i]["text"].max()) >= VOCAB) // 2 + 1
    due = -(-first_bad // 5) * 5
    engine = RecordingEngine()
    train_iter, _ = loop.build_data_iterators(args, ds, None, 0, 0, torch.device("cpu"), False, vocab_size=VOCAB)
    with pytest.raises(TokenIdError, match=r"bad\.bin: document 4 holds token id 57 \(its token 3\)"):
        loop.train(args, engine, cfg, train_iter, None, 0, 0, torch.device("cpu"), 0.0)
    assert engine.steps == due                     # stopped at the first agreement point after the bad batch
    assert 0 <= engine.max_seen < VOCAB            # the model never saw the id
    logged = [line for line in capsys.readouterr().out.splitlines() if line.startswith(" iteration")]
    assert len(logged) == due // 5 - 1             # the iteration that found it was not logged


def _check_agreement(rank, world, bad_rank):
    data_checks.reset()
    data_checks.agree()                            # nothing pending anywhere: nothing raised
    if rank == bad_rank:
        data_checks._pending = f"file.bin: document 9 (found on rank {rank})"
    try:
        data_checks.agree()
        raised = None
    except TokenIdError as exc:
        raised = str(exc)
    data_checks.reset()
    return raised


world_pool = dist_pool.pool_fixture(2)


@pytest.mark.parametrize("bad_rank", [0, 1])
def test_every_rank_raises_the_line_of_the_rank_that_found_it(world_pool, bad_rank):
    assert world_pool.run(_check_agreement, bad_rank) == [f"file.bin: document 9 (found on rank {bad_rank})"] * 2
