"""Layout equivalence: the same tiny Tokenformer, seed and data for 10 iterations at every (TP, PP, DP)
layout gives the (1,1,1) run's lm loss and gradient norm at every iteration (1e-4 relative, fp32),
with ZeRO-1 everywhere, ZeRO-2 where DeepSpeed allows it (PP = 1), and once with activation
recomputation in the pipeline. Sequence parallelism and the recomputation modes (selective, full
uniform/block) must give the same run without them (1e-5 relative) at TP 2 and 4, with PP 2 and
ZeRO-1 (SP_LAYOUTS; they share the pool of runs). The global batch (4 samples)
is the same in every layout; gradient accumulation absorbs the data-parallel size.

The (1,1,1) run itself is checked against a plain PyTorch loop written here (same model class,
AdamW, clipping, the learning-rate formula, the same batches), so the equivalence chain starts from
an independent reference. Gradient clipping at 0.5 is active at every step, so a mis-counted
tensor- or pipeline-parallel gradient norm would change the losses.

All runs start at once (two processes at a time) on first use; on 2 cores they take about 1.5-2
minutes together.
"""

import math

import pytest

from tests.helpers import layout_runs, train_runs

pytestmark = pytest.mark.slow

ITERS = layout_runs.ITERS
TRAIN = layout_runs.TRAIN  # shared with the multi-node tests, which compare against these runs

# (tp, pp, dp, zero stage, activation recomputation)
LAYOUTS = [(1, 1, 1, 1, 0), (2, 1, 1, 1, 0), (1, 2, 1, 1, 0), (1, 1, 2, 1, 0), (2, 2, 1, 1, 0), (1, 2, 2, 1, 0),
           (2, 1, 2, 1, 0), (1, 1, 2, 2, 0), (2, 1, 2, 2, 0), (1, 2, 1, 1, 1)]
# (tp, pp, dp, zero stage, extra flags) -> the run without those flags it must equal (in LAYOUTS, or TP 4 here)
SP_BASE = [(4, 1, 1, 1, 0)]
SP_LAYOUTS = {
    (2, 1, 1, 1, ("--sequence-parallel", "--recompute-granularity", "selective")): (2, 1, 1, 1, 0),
    (2, 2, 1, 1, ("--sequence-parallel", "--recompute-granularity", "full", "--recompute-method", "block",
                  "--recompute-num-layers", "1")): (2, 2, 1, 1, 0),
    (4, 1, 1, 1, ("--sequence-parallel", "--recompute-granularity", "full", "--recompute-method", "uniform",
                  "--recompute-num-layers", "2")): (4, 1, 1, 1, 0),
}


@pytest.fixture(scope="module")
def layout_logs(layout_pool):
    return layout_pool.logs(LAYOUTS, "layout equivalence")


@pytest.fixture(scope="module")
def sp_logs(layout_logs):
    """The sequence-parallel / recomputation runs and their TP = 4 base, with the LAYOUTS runs
    (a fixture of its own: its runs fit the per-test timeout after LAYOUTS has been built)."""
    return {**layout_logs, **layout_runs.run_all(SP_BASE + list(SP_LAYOUTS), "sequence parallel / recomputation")}


def _rows(log):
    rows = train_runs.parse_iterations(log)
    assert [r["iteration"] for r in rows] == list(range(1, ITERS + 1)), log[-3000:]
    return rows


@pytest.mark.parametrize("layout", LAYOUTS[1:],
                         ids=lambda l: "tp%d_pp%d_dp%d_zero%d" % l[:4] + ("_recompute" if l[4] else ""))
def test_layout_matches_single_rank(layout_logs, layout):
    base = _rows(layout_logs[LAYOUTS[0]])
    rows = _rows(layout_logs[layout])
    for b, r in zip(base, rows):
        assert r["lm loss"] == pytest.approx(b["lm loss"], rel=1e-4), (layout, r["iteration"])
        assert r["grad norm"] == pytest.approx(b["grad norm"], rel=1e-4), (layout, r["iteration"])
        assert r["consumed samples"] == b["consumed samples"]
        assert r["number of nan iterations"] == 0 and r["number of skipped iterations"] == 0
    # the parameter summary counts each parameter once, whatever the layout; only the vocabulary
    # padding grows with TP (101 ids padded to a multiple of 128 x TP rows of d = 32)
    tp = layout[0]
    padding_rows = (128 * tp) - 128
    assert train_runs.parameter_count(layout_logs[layout]) == \
        train_runs.parameter_count(layout_logs[LAYOUTS[0]]) + padding_rows * 32


@pytest.mark.parametrize("layout", list(SP_LAYOUTS), ids=lambda l: "tp%d_pp%d_dp%d_zero%d" % l[:4] + "_"
                         + "_".join(f.strip("-").replace("-", "_") for f in l[4]))
def test_sequence_parallel_and_recompute_match_plain_run(sp_logs, layout):
    base = _rows(sp_logs[SP_LAYOUTS[layout]])
    rows = _rows(sp_logs[layout])
    for b, r in zip(base, rows):
        assert r["lm loss"] == pytest.approx(b["lm loss"], rel=1e-5), (layout, r["iteration"])
        assert r["grad norm"] == pytest.approx(b["grad norm"], rel=1e-5), (layout, r["iteration"])
        assert r["number of nan iterations"] == 0 and r["number of skipped iterations"] == 0


def _reference_losses():
    """Plain PyTorch: same model class, AdamW, clip 0.5, cosine schedule with warmup, same batches."""
    import torch

    from megatron_tokenformer.config import TokenformerConfig
    from megatron_tokenformer.data.gpt_dataset import MockGPTDataset
    from megatron_tokenformer.model import TokenformerLM

    vocab = 101  # NullTokenizer(--vocab-size 100): 100 ids + end-of-document
    cfg = TokenformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=vocab,
                            qkv_num_param_tokens=16, proj_num_param_tokens=16, ffn_num_param_tokens=32)
    torch.manual_seed(1234)
    model = TokenformerLM(cfg, seed=1234)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=2e-3, betas=(0.9, 0.999), eps=1e-8)
    data = MockGPTDataset(ITERS * 4, 16, vocab, seed=1234)
    max_lr, min_lr, warmup, decay_iters = 2e-3, 2e-4, 2, ITERS
    losses, norms = [], []
    for it in range(ITERS):
        if it < warmup:
            lr = max_lr * (it + 1) / warmup
        else:
            r = (it - warmup) / (decay_iters - warmup)
            lr = min_lr + (max_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * r))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        total = 0.0
        for j in range(4):  # micro-batches of 1 sample, in sample order
            text = torch.as_tensor(data[it * 4 + j]["text"]).unsqueeze(0)
            loss = model(text[:, :-1], text[:, 1:], torch.ones(1, 16))
            (loss / 4).backward()
            total += float(loss.detach()) / 4
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)))
        opt.step()
        losses.append(total)
    return losses, norms


def test_single_rank_matches_plain_pytorch(layout_logs):
    rows = _rows(layout_logs[LAYOUTS[0]])
    ref_losses, ref_norms = _reference_losses()
    for r, loss, norm in zip(rows, ref_losses, ref_norms):
        assert r["lm loss"] == pytest.approx(loss, rel=1e-4), r["iteration"]
        assert r["grad norm"] == pytest.approx(norm, rel=1e-4), r["iteration"]
    assert ref_losses[-1] < ref_losses[0]
