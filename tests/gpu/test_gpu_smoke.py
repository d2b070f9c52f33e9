"""GPU smoke tests: the paths no CPU test runs (NCCL, CUDA device binding, bf16 on tensor cores).
Skipped without CUDA (one line: the reason). On one GPU the two-rank runs share it over gloo (NCCL
refuses two ranks on one device); with two or more they use NCCL.

* TP 2 equals TP 1 (fp32, same seed and batches);
* a save at iteration 3 resumed to 6 equals the straight run (same layout);
* a checkpoint saved at TP 1 loads at TP 2 through the resharding path (bf16, BF16_Optimizer) and
  follows the straight run;
* the fused Pattention normalisation (the default on CUDA) equals the plain kernels, in a run and
  op by op (every normalisation, fp32 and bf16);
* the embedding's id check on CUDA (torch._assert_async: a device-side assert, never a silent zero).

About six short training runs; a few minutes on one H200 with bench start-up included.
"""

import os

import pytest
import torch

from tests.helpers import train_runs

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: GPU smoke tests skipped")]

ARGS = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "128",
        "--qkv-num-param-tokens", "64", "--proj-num-param-tokens", "64", "--ffn-num-param-tokens", "128",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3", "--lr-warmup-iters", "1",
        "--mock-data", "--vocab-size", "1000", "--log-interval", "1", "--eval-iters", "0", "--seed", "9",
        "--num-workers", "0"]


def _two_rank_backend():
    return [] if torch.cuda.device_count() >= 2 else ["--distributed-backend", "gloo"]


def _losses(nproc, extra, iterations):
    out = train_runs.check_ok(train_runs.run(train_runs.torchrun(nproc, ARGS + extra), timeout=240,
                                             extra_env={"CUDA_DEVICE_MAX_CONNECTIONS": "1"}))
    rows = train_runs.parse_iterations(out)
    assert len(rows) == iterations, out[-3000:]
    assert "peak GPU memory" in out  # it ran on the GPU
    return [r["lm loss"] for r in rows]


@pytest.fixture(scope="module")
def straight():
    return _losses(1, ["--train-iters", "6"], 6)


def test_tp2_equals_tp1(straight):
    tp2 = _losses(2, ["--train-iters", "6"] + train_runs.layout_args(2, 1) + _two_rank_backend(), 6)
    assert tp2 == pytest.approx(straight, rel=1e-4)


def test_save_and_resume(straight, tmp_path):
    save = str(tmp_path / "ckpt")
    first = _losses(1, ["--train-iters", "6", "--exit-interval", "3", "--save", save], 3)
    second = _losses(1, ["--train-iters", "6", "--save", save, "--load", save], 3)
    assert first + second == pytest.approx(straight, rel=1e-5)


def test_resharded_load_bf16(tmp_path):
    save = str(tmp_path / "bf16")
    whole = _losses(1, ["--train-iters", "6", "--bf16", "--save", save, "--save-interval", "3"], 6)
    load = str(tmp_path / "from3")
    os.makedirs(load)
    os.symlink(os.path.join(save, "global_step3"), os.path.join(load, "global_step3"))
    with open(os.path.join(load, "latest"), "w") as f:
        f.write("global_step3")
    resumed = _losses(2, ["--train-iters", "6", "--bf16", "--load", load] + train_runs.layout_args(2, 1)
                      + _two_rank_backend(), 3)
    assert resumed == pytest.approx(whole[3:], rel=2e-2)


def test_fused_norm_equals_unfused(straight):
    """The straight run used the default on CUDA (--fused-pattention-norm); the plain kernels follow it."""
    unfused = _losses(1, ["--train-iters", "6", "--no-fused-pattention-norm"], 6)
    assert unfused == pytest.approx(straight, rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kernels_on_cuda(dtype):
    """The compiled (Triton) kernels against the autograd composition on the GPU, every normalisation."""
    from megatron_tokenformer.ops.pattention_norm import NORMALIZATIONS, pattention_normalize_combine
    g = torch.Generator().manual_seed(0)
    a0 = (torch.randn(4, 256, 512, generator=g) * 2).to("cuda", dtype)
    v0 = (torch.randn(512, 64, generator=g) * 0.1).to("cuda", dtype)
    w = torch.randn(4, 256, 64, generator=g).to("cuda")
    for normalization in NORMALIZATIONS:
        results = []
        for fused, lean in ((True, True), (False, False)):
            a, v = a0.clone().requires_grad_(), v0.clone().requires_grad_()
            (out,) = pattention_normalize_combine([a], [v], normalization, [3.0], [512], lean=lean, fused=fused)
            (out.float() * w).sum().backward()
            results.append((out.detach(), a.grad, v.grad))
        for got, ref in zip(*results):
            rel = ((got.double() - ref.double()).norm() / ref.double().norm()).item()
            assert rel < (1e-5 if dtype == torch.float32 else 2e-2), (normalization, rel)


_EMBED_BAD_ID = """
import torch
from megatron_tokenformer.tensor_parallel.layers import VocabParallelEmbedding
emb = VocabParallelEmbedding(12, 4, vocab_size=11, device="cuda")
out = emb(torch.tensor([[0, 5, 10]], device="cuda"))      # in range: no host sync, no error
torch.cuda.synchronize()
print("in-range ok", flush=True)
out = emb(torch.tensor([[0, 11, 3]], device="cuda"))      # the padding id: outside the vocabulary
torch.cuda.synchronize()                                   # the queued assertion fires here at the latest
print("NOT REFUSED", flush=True)
"""


def test_embedding_refuses_an_out_of_vocabulary_id_on_cuda():
    """On CUDA the embedding's check is torch._assert_async: the process ends with a device-side assert
    (loud, never a silent zero embedding); an in-range batch passes."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", _EMBED_BAD_ID], capture_output=True, text=True, timeout=120,
                       env=train_runs.env())
    assert "in-range ok" in r.stdout and "NOT REFUSED" not in r.stdout, r.stdout + r.stderr[-3000:]
    assert r.returncode != 0 and "assert" in r.stderr.lower(), r.stderr[-3000:]


def test_fused_kernel_probe_compiles_on_this_gpu():
    """The start-up probe (issue 21 item 3) says the toolchain works here, so the default uses the fused kernels."""
    from megatron_tokenformer.ops.pattention_norm import probe_fused_kernels
    assert probe_fused_kernels(torch.device("cuda", 0)) is None
