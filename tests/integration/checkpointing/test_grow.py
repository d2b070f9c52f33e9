"""Growth keeps the function: a grown checkpoint's logits and validation loss equal the original's.

The reference is the source checkpoint evaluated by the plain model (no DeepSpeed): token growth x2
and x4 and depth growth (2 -> 4 blocks, interleaved), at TP = 1 (in this process) and TP = 2 (two
gloo ranks, source and growth at TP = 2). Then training continues from a grown checkpoint with the
source's next loss and the new tokens/blocks move away from their zero init.
"""

import os
import sys

import pytest
import torch
import torch.multiprocessing as mp

from megatron_tokenformer.checkpointing.expand import ExpandOptions, expand_checkpoint
from megatron_tokenformer.checkpointing.format.view import CheckpointView
from megatron_tokenformer.checkpointing.grow import interleaved_positions
from tests.helpers import ckpt_runs as R
from tests.helpers import train_runs

pytestmark = pytest.mark.slow

GROWTHS = {"tokens_x2": dict(param_token_growth_factor=2), "tokens_x4": dict(param_token_growth_factor=4),
           "depth_2_to_4": dict(num_layers=4)}
VOCAB = 101


def _batch(n=4, seed=123):
    from megatron_tokenformer.data.gpt_dataset import MockGPTDataset
    ds = MockGPTDataset(1000, 16, VOCAB, seed=seed)  # a "validation" set the run never trained on
    text = torch.stack([torch.as_tensor(ds[i]["text"]) for i in range(n)]).long()
    return text[:, :-1], text[:, 1:]


def _evaluate(step_dir):
    """(vocab-parallel logits [b, s, V_pad/p] of this rank, validation loss) of a checkpoint, plain model."""
    from megatron_tokenformer.checkpointing.reshard import load_module_from_view
    from megatron_tokenformer.model import TokenformerLM
    with CheckpointView(step_dir) as view:
        model = TokenformerLM(view.config)
        load_module_from_view(model, view, view.config)
    tokens, labels = _batch()
    with torch.no_grad():
        return model(tokens), float(model(tokens, labels))


def _max_diff(a, b):
    """max |a - b| over the real vocabulary entries (padding logits are -inf in both)."""
    finite = torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), finite)
    return float((a[finite] - b[finite]).abs().max()) if finite.any() else 0.0


def _grow(src_save, name, workdir, tp, **kw):
    dst = os.path.join(workdir, name)
    expand_checkpoint(ExpandOptions(load=src_save, save=dst, target_tensor_model_parallel_size=tp, **kw),
                      log=lambda m: None)
    return os.path.join(dst, "global_step10")


@pytest.fixture(scope="module")
def sources(straight_runs, ckpt_workdir):
    out = {}
    for tp in (1, 2):
        _, save = straight_runs((tp, 1, 1))
        src = R.checkpoint_at(save, 10, os.path.join(ckpt_workdir, f"grow_src_tp{tp}"))
        grown = {name: _grow(src, f"grown_{name}_tp{tp}", ckpt_workdir, tp, **kw) for name, kw in GROWTHS.items()}
        out[tp] = (os.path.join(src, "global_step10"), grown)
    return out


def test_grown_config(sources):
    src, grown = sources[1]
    with CheckpointView(src) as a, CheckpointView(grown["tokens_x4"]) as b, CheckpointView(grown["depth_2_to_4"]) as c:
        assert (b.config.qkv_num_param_tokens, b.config.proj_num_param_tokens, b.config.ffn_num_param_tokens) == \
            (64, 64, 128)
        # tau is kept (sqrt of the OLD token counts), so the function is unchanged
        assert (b.config.qkv_tau, b.config.proj_tau, b.config.ffn_tau) == (a.config.qkv_tau, a.config.proj_tau,
                                                                           a.config.ffn_tau) == (4.0, 4.0, 32 ** 0.5)
        assert c.config.num_layers == 4 and interleaved_positions(2, 4) == [1, 3]
        # old tokens are the first rows; new keys are zero; moments of new rows are zero
        key = "layers.1.mlp.key_param_tokens"
        for k in ("fp32", "exp_avg", "exp_avg_sq"):
            old = a.read(key, k)
            new = b.read(key, k)
            assert torch.equal(new[:32], old) and torch.count_nonzero(new[32:]) == 0
        val = b.read("layers.0.attention.dense.value_param_tokens")
        assert torch.equal(val[:16], a.read("layers.0.attention.dense.value_param_tokens"))
        assert val[16:].std() > 0.05                       # random new values, so the new keys can learn
        assert b.params[key].step == a.params[key].step == 10.0
        # depth: old block 1 moved to position 2; new block 1 is the identity (zero output values)
        assert torch.equal(c.read("layers.2.mlp.value_param_tokens"), a.read("layers.1.mlp.value_param_tokens"))
        assert torch.count_nonzero(c.read("layers.1.mlp.value_param_tokens")) == 0
        assert torch.count_nonzero(c.read("layers.3.attention.dense.value_param_tokens")) == 0
        assert torch.count_nonzero(c.read("layers.3.attention.query.key_param_tokens")) > 0
        assert c.training_state["iteration"] == 10 and c.training_state["lr_scheduler"]["num_steps"] == 10


@pytest.mark.parametrize("growth", sorted(GROWTHS))
def test_growth_preserves_logits_tp1(sources, growth):
    src, grown = sources[1]
    ref_logits, ref_loss = _evaluate(src)
    logits, loss = _evaluate(grown[growth])
    assert logits.shape == ref_logits.shape
    assert _max_diff(logits, ref_logits) <= 1e-5
    assert loss == pytest.approx(ref_loss, rel=1e-6)


def _tp2_worker(rank, world, port, dirs, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    sys.path.insert(0, R.ROOT)
    from megatron_tokenformer import model as _model  # noqa: F401
    from megatron_tokenformer import parallel_state
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(2, 1)
    results = {name: _evaluate(path) for name, path in dirs.items()}
    torch.save(results, os.path.join(out_dir, f"tp2_rank{rank}.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_growth_preserves_logits_tp2(sources, ckpt_workdir):
    src, grown = sources[2]
    dirs = dict(grown, source=src)
    mp.spawn(_tp2_worker, args=(2, train_runs.free_port(), dirs, ckpt_workdir), nprocs=2, join=True)
    tp1_logits, tp1_loss = _evaluate(sources[1][0])
    real_entries = 0
    for rank in range(2):
        res = torch.load(os.path.join(ckpt_workdir, f"tp2_rank{rank}.pt"))
        ref_logits, ref_loss = res["source"]
        assert ref_logits.shape[-1] == 256 // 2  # this rank's block of the vocabulary (101 padded to 256 at TP 2)
        real_entries += int(torch.isfinite(ref_logits[0, 0]).sum())
        for name in GROWTHS:
            logits, loss = res[name]
            assert _max_diff(logits, ref_logits) <= 1e-5, (rank, name)
            assert loss == pytest.approx(ref_loss, rel=1e-6), (rank, name)
        # the TP=2 run's own loss is the same model quality class as TP=1's (different training run, same seed)
        assert ref_loss == pytest.approx(tp1_loss, rel=1e-2)
    assert real_entries == VOCAB


def test_training_after_growth(straight_runs, ckpt_workdir):
    ref, save = straight_runs((1, 1, 1))
    src = R.checkpoint_at(save, 10, os.path.join(ckpt_workdir, "gt_src"))
    grown = os.path.join(ckpt_workdir, "gt_grown")
    expand_checkpoint(ExpandOptions(load=src, save=grown, param_token_growth_factor=2, num_layers=3),
                      log=lambda m: None)
    # no architecture flags: the grown checkpoint's config (tokens, layers, tau) is used
    # (--train-iters 13 also shortens the LR decay the source was trained with: keep the flags' schedule)
    got, out = R.resume(ckpt_workdir, "gt_run", (1, 1, 1), grown, 13, ["--override-opt-param-scheduler"],
                        arch=False)
    assert sorted(got) == [11, 12, 13]
    # the first iteration trained from the grown checkpoint has the source's loss on that batch
    assert got[11] == pytest.approx(ref[11], rel=1e-6)
    with CheckpointView(os.path.join(out, "global_step13")) as v, \
            CheckpointView(os.path.join(grown, "global_step10")) as g:
        assert v.config.num_layers == 3 and v.config.qkv_num_param_tokens == 32
        assert interleaved_positions(2, 3) == [2]  # the new block goes after the last old one
        for layer in (0, 1):
            for sub, n_old in (("attention.query", 16), ("attention.dense", 16), ("mlp", 32)):
                keys = v.read(f"layers.{layer}.{sub}.key_param_tokens")
                assert torch.count_nonzero(g.read(f"layers.{layer}.{sub}.key_param_tokens")[n_old:]) == 0
                assert keys[n_old:].norm(dim=1).min() > 1e-4, (layer, sub)   # every new key moved
        for sub in ("attention.dense", "mlp"):
            assert torch.count_nonzero(g.read(f"layers.2.{sub}.value_param_tokens")) == 0
            assert v.read(f"layers.2.{sub}.value_param_tokens").norm() > 1e-4   # the identity block trains
