"""Net2Net width growth of the baseline Transformer (checkpointing/net2net.py; expand_checkpoint.py --hidden-size).

The reference is the narrow model itself: after widening d -> k d (heads x k, MLP f -> f'), the wide
model's logits must equal the narrow model's, and its residual stream after every block must be k
concatenated copies of the narrow one's (which is what makes the LayerNorms exact).
"""

import os
import subprocess
import sys

import pytest
import torch

from megatron_tokenformer.checkpointing.expand import ExpandOptions
from megatron_tokenformer.checkpointing.format.view import CheckpointView
from megatron_tokenformer.checkpointing.net2net import Net2NetError, plan_from_options, plan_widening, widen_state_dict
from megatron_tokenformer.config import TokenformerConfig
from megatron_tokenformer.model import TokenformerLM
from megatron_tokenformer.model.transformer import transformer_config
from tests.helpers.paths import REPO_ROOT as ROOT

VOCAB = 61


def narrow_model(seed=11, **overrides):
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=VOCAB,
                ffn_hidden_size=48, init_method_std=0.2, value_init=0.2, rotary_percent=0.5)
    base.update(overrides)
    model = TokenformerLM(transformer_config(**base), seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-trivial LayerNorm weights and biases (a trained model has them)
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


def block_outputs(model, ids):
    outs = []
    hooks = [layer.register_forward_hook(lambda m, i, o: outs.append(o.detach())) for layer in model.layers]
    logits = model(ids)
    for h in hooks:
        h.remove()
    return logits, outs


def assert_same_logits(wide, narrow):
    finite = torch.isfinite(narrow)
    assert torch.equal(finite, torch.isfinite(wide))
    err = ((wide[finite] - narrow[finite]).abs() / (1 + narrow[finite].abs())).max().item()
    assert err < 2e-5, err


@pytest.mark.parametrize("factor,ffn", [(2, None), (3, 100), (1, 60)])
def test_widened_model_computes_the_same_function(factor, ffn):
    narrow = narrow_model()
    plan = plan_widening(narrow.config, 32 * factor, ffn)
    cfg = plan.new_config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.ffn_hidden_size) == \
        (32 * factor, 4 * factor, 48 * factor if ffn is None else ffn)
    assert cfg.head_dim == narrow.config.head_dim and cfg.rotary_dim == narrow.config.rotary_dim
    wide = TokenformerLM(cfg)
    wide.load_state_dict(widen_state_dict(dict(narrow.state_dict()), plan))
    ids = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, ref_blocks = block_outputs(narrow, ids)
        got, got_blocks = block_outputs(wide, ids)
    assert_same_logits(got, ref)
    for r, w in zip(ref_blocks, got_blocks):  # the residual stream: k concatenated copies
        assert torch.allclose(w, r.repeat(1, 1, factor), rtol=1e-5, atol=1e-5)
    labels = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(2))
    assert abs(wide(ids, labels).item() - narrow(ids, labels).item()) < 1e-5


def test_copies_stay_symmetric_without_noise_and_diverge_with_it():
    narrow = narrow_model()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    loss_narrow = narrow(ids, ids).item()
    for noise in (0.0, 0.05):
        plan = plan_widening(narrow.config, 64, noise_std=noise, seed=5)
        wide = TokenformerLM(plan.new_config)
        wide.load_state_dict(widen_state_dict(dict(narrow.state_dict()), plan))
        loss = wide(ids, ids)
        loss.backward()
        w = wide.layers[0].mlp.dense_h_to_4h.weight
        if noise == 0:
            assert abs(loss.item() - loss_narrow) < 1e-5
            # input columns j and j + 32 are copies of the same residual channel: same values, same gradients
            assert torch.equal(w[:, :32], w[:, 32:]) and torch.equal(w.grad[:, :32], w.grad[:, 32:])
        else:
            assert 0 < abs(loss.item() - loss_narrow) < 0.05 * loss_narrow
            assert not torch.equal(w.grad[:, :32], w.grad[:, 32:])
            # noise only on the new copies: the original block (rows and columns < old size) is untouched
            ref = narrow.layers[0].mlp.dense_h_to_4h.weight / 2
            assert torch.equal(w[:48, :32].detach(), ref.detach())


def test_plan_errors():
    cfg = narrow_model().config
    with pytest.raises(Net2NetError, match=r"--hidden-size 48 must be a multiple of the checkpoint's hidden size 32"):
        plan_widening(cfg, 48)
    with pytest.raises(Net2NetError, match=r"--ffn-hidden-size 40 is smaller than the checkpoint's 48"):
        plan_widening(cfg, 64, 40)
    with pytest.raises(Net2NetError, match="--net2net-noise-std must be a finite number >= 0"):
        plan_widening(cfg, 64, noise_std=-1.0)
    tokenformer = TokenformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, seq_length=4, vocab_size=9,
                                    qkv_num_param_tokens=2, proj_num_param_tokens=2, ffn_num_param_tokens=2)
    with pytest.raises(Net2NetError, match="applies to checkpoints of --model-type transformer"):
        plan_widening(tokenformer, 16)
    opts = ExpandOptions(load="a", save="b", param_token_growth_factor=2.0, num_layers=4)
    with pytest.raises(Net2NetError, match="--param-token-growth-factor, --num-layers: Tokenformer growth flags, but "
                                           "this checkpoint is a --model-type transformer"):
        plan_from_options(cfg, opts)
    plan = plan_from_options(cfg, ExpandOptions(load="a", save="b"))  # no flags: a plain copy, optimizer kept
    assert not plan.widens and not plan.reset_optimizer


def _full_state(step_dir, padded_vocab):
    """TP = 1 model state dict from a checkpoint folder (embedding re-padded with zero rows)."""
    view = CheckpointView(step_dir)
    try:
        state = {name: view.read(name) for name in view.params}
        config = view.config
    finally:
        view.close()
    emb = state["embedding.word_embeddings.weight"]
    state["embedding.word_embeddings.weight"] = torch.cat(
        [emb, torch.zeros(padded_vocab - emb.shape[0], emb.shape[1])])
    return config, state


def test_expand_checkpoint_tool_widens_a_trained_checkpoint(tmp_path):
    """pretrain_tokenformer.py (transformer) -> tools/expand_checkpoint.py --hidden-size -> same logits."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    ckpt, wide_dir = tmp_path / "ckpt", tmp_path / "wide"
    subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_tokenformer.py"), "--model-type", "transformer",
                    "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
                    "--micro-batch-size", "2", "--train-iters", "3", "--lr", "3e-3", "--mock-data", "--vocab-size",
                    "100", "--eval-iters", "0", "--save", str(ckpt)], env=env, check=True, capture_output=True,
                   cwd=tmp_path)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "expand_checkpoint.py"), "--load", str(ckpt),
                           "--save", str(wide_dir), "--hidden-size", "64", "--ffn-hidden-size", "160",
                           "--target-tensor-model-parallel-size", "2"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    narrow_cfg, narrow_state = _full_state(str(ckpt / "global_step3"), 128)
    wide_cfg, wide_state = _full_state(str(wide_dir / "global_step3"), 128)
    assert (wide_cfg.hidden_size, wide_cfg.num_attention_heads, wide_cfg.ffn_hidden_size) == (64, 8, 160)
    narrow, wide = TokenformerLM(narrow_cfg), TokenformerLM(wide_cfg)
    narrow.load_state_dict(narrow_state)
    wide.load_state_dict(wide_state)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert_same_logits(wide(ids), narrow(ids))
    # bad input: one clear error naming the flag, exit status 2, nothing written
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "expand_checkpoint.py"), "--load", str(ckpt),
                           "--save", str(tmp_path / "bad"), "--hidden-size", "40"], env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "--hidden-size 40 must be a multiple" in proc.stderr
    assert not (tmp_path / "bad").exists()
