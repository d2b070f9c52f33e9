#!/usr/bin/env python
"""GPU training throughput: the Tokenformer-354M recipe against the equal-size baseline Transformer.

Both models train through pretrain_tokenformer.py (DeepSpeed engine, ZeRO-1, bf16, sequence 2048,
activation recomputation as in examples/slurm/pretrain_354m.sbatch) on every visible GPU (data
parallel, one rank per GPU) for a fixed number of iterations on synthetic tokens, in one invocation:

* tokens/s (whole job), TFLOP/s per GPU (hardware FLOPs, recomputation included) and MFU (model
  FLOPs over the device's bf16 peak, training/flops.py), read from the last log interval (after the
  warm-up interval);
* peak GPU memory of rank 0 (``torch.cuda.max_memory_allocated``);
* the Tokenformer / Transformer ratio of tokens/s;
* with and without the fused Pattention normalisation when the training script has
  ``--fused-pattention-norm`` (measured only where the flag exists).

The baseline is the same depth and width with an MLP of 6144 = 6 d: per layer 4 d^2 + 2 d f = 16 d^2 weights,
exactly the Tokenformer block's 2 d (3 n_qkv + n_proj + n_ffn) = 16 d^2 with n = 1024, 1024, 4096.

    python benchmarks/gpu_throughput.py                  # all visible GPUs, 30 iterations each
    python benchmarks/gpu_throughput.py --iters 20 --json out.json

On a machine without CUDA it prints one line saying so and exits 0. Designed to take a few minutes
on one H200 (start-up of each run included).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "pretrain_tokenformer.py")

NO_CUDA_LINE = "gpu_throughput.py: no CUDA device on this machine; nothing to measure"

ARCH = ["--num-layers", "24", "--hidden-size", "1024", "--num-attention-heads", "16", "--seq-length", "2048",
        "--max-position-embeddings", "2048", "--rotary-percent", "0.25", "--checkpoint-activations"]
TOKENFORMER = ["--qkv-num-param-tokens", "1024", "--proj-num-param-tokens", "1024", "--ffn-num-param-tokens", "4096",
               "--pattention-normalization", "l2_norm_gelu"]
TRANSFORMER = ["--model-type", "transformer", "--ffn-hidden-size", "6144"]


def _common(iters: int, mbs: int, ngpus: int, log_interval: int) -> List[str]:
    return ["--micro-batch-size", str(mbs), "--global-batch-size", str(mbs * ngpus), "--train-iters", str(iters),
            "--lr", "3e-4", "--lr-decay-style", "constant", "--bf16", "--zero-stage", "1",
            "--mock-data", "--vocab-size", "50000", "--log-interval", str(log_interval), "--eval-iters", "0",
            "--seed", "1234"]


_FIELD = re.compile(r"\s*([^:|]+):\s*([^|]*?)\s*\|")


def parse_last_interval(text: str) -> Dict[str, float]:
    """Fields of the last ``iteration N/ M | ...`` line (numbers) plus the peak memory line."""
    last = None
    for line in text.splitlines():
        if re.match(r"\s*iteration\s+\d+/\s*\d+\s*\|", line):
            last = line
    if last is None:
        raise RuntimeError("no iteration line in the training log")
    row = {}
    for key, value in _FIELD.findall(last.split("|", 1)[1]):
        try:
            row[key.strip()] = float(value.rstrip("%"))
        except ValueError:
            pass
    m = re.search(r"peak GPU memory: ([0-9.]+) GiB allocated", text)
    row["peak memory (GiB)"] = float(m.group(1)) if m else float("nan")
    return row


def run_one(name: str, model_args: List[str], args, ngpus: int) -> Dict[str, float]:
    flags = ARCH + model_args + _common(args.iters, args.micro_batch_size, ngpus, args.log_interval) + args.extra
    if ngpus == 1:
        cmd = [sys.executable, SCRIPT] + flags
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ngpus), SCRIPT] + flags
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    start = time.time()
    returncode, stdout, stderr = run_bounded(cmd, args.timeout, cwd=ROOT, env=env)
    if returncode is None:
        sys.stderr.write(stdout[-3000:] + stderr[-3000:])
        raise SystemExit(f"gpu_throughput.py: the {name} run took more than --timeout {args.timeout:g} s; "
                         f"its whole process group was killed")
    if returncode != 0:
        sys.stderr.write(stdout[-3000:] + stderr[-3000:])
        raise SystemExit(f"gpu_throughput.py: the {name} run failed (exit {returncode})")
    row = parse_last_interval(stdout)
    row["wall (s)"] = time.time() - start
    return row


def run_bounded(cmd: List[str], timeout: float, **popen_kwargs):
    """Run ``cmd`` in its own session; past ``timeout`` seconds kill its whole process group (torchrun,
    every rank it started, their compile workers) and return ``(None, stdout, stderr)``; else
    ``(returncode, stdout, stderr)``. Killing only the launcher would leave ranks holding the GPUs."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            **popen_kwargs)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        return proc.returncode, stdout, stderr
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        stdout, stderr = proc.communicate()
        return None, stdout or "", stderr or ""


def has_flag(flag: str) -> bool:
    out = subprocess.run([sys.executable, SCRIPT, "--help"], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")))
    return flag in out.stdout


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=30, help="training iterations per run (default 30)")
    parser.add_argument("--log-interval", type=int, default=10, help="the last interval is measured (default 10)")
    parser.add_argument("--micro-batch-size", type=int, default=4)
    # 600: the first fused run compiles the Pattention kernels cold (inductor + Triton, minutes on a busy node;
    # later runs reuse the cache), on top of start-up and 30 iterations of the 354M model
    parser.add_argument("--timeout", type=float, default=600, help="seconds per run (default 600; a run past it "
                                                                   "is killed with its whole process group)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags appended to every run")
    args = parser.parse_args(argv)
    if args.iters < 2 * args.log_interval:
        parser.error("--iters must be at least twice --log-interval (the first interval is warm-up)")

    import torch
    if not torch.cuda.is_available():
        print(NO_CUDA_LINE)
        return 0
    ngpus = torch.cuda.device_count()
    device = torch.cuda.get_device_name(0)
    runs = {"tokenformer": TOKENFORMER, "transformer": TRANSFORMER}
    if has_flag("--fused-pattention-norm"):
        runs = {"tokenformer (fused norm)": TOKENFORMER + ["--fused-pattention-norm"],
                "tokenformer (unfused norm)": TOKENFORMER + ["--no-fused-pattention-norm"],
                "transformer": TRANSFORMER}
    results = {name: run_one(name, model_args, args, ngpus) for name, model_args in runs.items()}
    base = results["transformer"]["tokens/s"]
    print(f"device: {ngpus} x {device}; bf16, sequence 2048, micro batch {args.micro_batch_size} per GPU, "
          f"{args.iters} iterations (last {args.log_interval} measured)")
    print(f"{'model':28s} {'tokens/s':>12s} {'TFLOP/s/GPU':>12s} {'MFU':>7s} {'peak GiB':>9s} {'vs Transformer':>15s}")
    for name, r in results.items():
        print(f"{name:28s} {r['tokens/s']:12.0f} {r.get('TFLOP/s per GPU', float('nan')):12.1f} "
              f"{r.get('MFU', float('nan')):6.1f}% {r['peak memory (GiB)']:9.2f} {r['tokens/s'] / base:15.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "gpus": ngpus, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
