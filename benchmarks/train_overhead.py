#!/usr/bin/env python
"""Training-system overhead: pretrain_tokenformer.py (DeepSpeed engine, ZeRO-1, logging, data loader)
against a minimal plain-PyTorch loop with the same model class, optimizer and batches, in one
invocation; and tensor parallelism 2 against 1 on the same cores, with the collectives TP issues.

    python benchmarks/train_overhead.py                 # writes the section of docs/benchmarks.md
    python benchmarks/train_overhead.py --no-write --iters 12

Both sides run on CPU with the same number of threads; tokens/s are measured after warm-up
iterations; each side runs ``--repeats`` times, interleaved, and the best run counts (the machine
may be shared).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import subprocess
import sys
import time
from typing import Dict, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SECTION = "## Training overhead (issue 4)"

MODEL = dict(num_layers=4, hidden_size=256, num_attention_heads=8, seq_length=256, qkv_num_param_tokens=256,
             proj_num_param_tokens=256, ffn_num_param_tokens=1024)
TEXT_VOCAB = 4095  # NullTokenizer: + end-of-document = 4096 ids
MBS, GBS, LR, CLIP, WD, SEED = 4, 8, 1e-3, 1.0, 0.01, 1234


def _flags(iters: int, log_interval: int) -> List[str]:
    m = MODEL
    return ["--num-layers", str(m["num_layers"]), "--hidden-size", str(m["hidden_size"]),
            "--num-attention-heads", str(m["num_attention_heads"]), "--seq-length", str(m["seq_length"]),
            "--qkv-num-param-tokens", str(m["qkv_num_param_tokens"]),
            "--proj-num-param-tokens", str(m["proj_num_param_tokens"]),
            "--ffn-num-param-tokens", str(m["ffn_num_param_tokens"]),
            "--micro-batch-size", str(MBS), "--global-batch-size", str(GBS), "--train-iters", str(iters),
            "--lr", str(LR), "--lr-decay-style", "constant", "--clip-grad", str(CLIP), "--weight-decay", str(WD),
            "--mock-data", "--vocab-size", str(TEXT_VOCAB), "--seed", str(SEED), "--log-interval", str(log_interval),
            "--eval-iters", "0"]


def _env(threads: int) -> Dict[str, str]:
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_pretrain(nproc: int, tp: int, iters: int, warmup: int, threads: int) -> Tuple[float, str]:
    """tokens/s of pretrain_tokenformer.py over the log intervals after ``warmup`` iterations."""
    script = os.path.join(ROOT, "pretrain_tokenformer.py")
    flags = _flags(iters, warmup) + ["--tensor-model-parallel-size", str(tp)]
    if nproc == 1:
        cmd = [sys.executable, script] + flags
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(_free_port()), script] + flags
    out = subprocess.run(cmd, cwd=ROOT, env=_env(threads), capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    text = out.stdout + out.stderr
    ms = [float(x) for x in re.findall(r"elapsed time per iteration \(ms\): ([0-9.]+)", text)]
    steady = ms[1:]  # the first interval holds the warm-up iterations
    tokens_per_iter = GBS * MODEL["seq_length"]
    return tokens_per_iter * 1000.0 * len(steady) / sum(steady), text


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_plain(iters: int, warmup: int, threads: int) -> float:
    """The same training in a plain loop: TokenformerLM, torch AdamW, clipping, the same batches."""
    import torch

    from megatron_tokenformer.config import TokenformerConfig
    from megatron_tokenformer.data.gpt_dataset import MockGPTDataset
    from megatron_tokenformer.model import TokenformerLM

    torch.set_num_threads(threads)
    vocab = TEXT_VOCAB + 1
    cfg = TokenformerConfig(vocab_size=vocab, **MODEL)
    torch.manual_seed(SEED)
    model = TokenformerLM(cfg, seed=SEED)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR)
    data = MockGPTDataset(iters * GBS, MODEL["seq_length"], vocab, seed=SEED)
    loader = torch.utils.data.DataLoader(data, batch_size=MBS, shuffle=False)
    batches = iter(loader)
    ga = GBS // MBS
    start = None
    for it in range(iters):
        if it == warmup:
            start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for _ in range(ga):
            text = next(batches)["text"]
            loss = model(text[:, :-1], text[:, 1:], torch.ones(text.shape[0], text.shape[1] - 1))
            (loss / ga).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
    elapsed = time.perf_counter() - start
    return (iters - warmup) * GBS * MODEL["seq_length"] / elapsed


# --------------------------------------------------------------------------- collective counts at TP = 2


def _count_worker(rank: int, world: int, port: int, queue) -> None:
    import torch
    import torch.distributed as dist

    from megatron_tokenformer import parallel_state
    from megatron_tokenformer.config import TokenformerConfig
    from megatron_tokenformer.model import TokenformerLM
    from megatron_tokenformer.tensor_parallel import count_collectives

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(world, 1)
    cfg = TokenformerConfig(vocab_size=TEXT_VOCAB + 1, **MODEL)
    model = TokenformerLM(cfg, seed=SEED)
    text = torch.randint(0, TEXT_VOCAB, (MBS, MODEL["seq_length"] + 1))
    with count_collectives() as fwd:
        loss = model(text[:, :-1], text[:, 1:])
    with count_collectives() as bwd:
        loss.backward()
    if rank == 0:
        queue.put((list(fwd), list(bwd)))
    dist.barrier()
    dist.destroy_process_group()


def collective_counts(tp: int = 2):
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_count_worker, args=(r, tp, port, queue)) for r in range(tp)]
    for p in procs:
        p.start()
    result = queue.get(timeout=600)
    for p in procs:
        p.join(timeout=120)
    return result


def _summarise(log) -> Dict[str, Tuple[int, int]]:
    out: Dict[str, Tuple[int, int]] = {}
    for kind, numel in log:
        calls, elems = out.get(kind, (0, 0))
        out[kind] = (calls + 1, elems + numel)
    return out


# --------------------------------------------------------------------------- report


def write_section(path: str, body: str) -> None:
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Benchmarks\n"
    block = SECTION + "\n\n" + body.strip() + "\n"
    start = text.find(SECTION)
    if start >= 0:
        nxt = text.find("\n## ", start + len(SECTION))
        text = text[:start] + block + ("\n" + text[nxt + 1:] if nxt >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=20, help="iterations per run")
    p.add_argument("--warmup", type=int, default=5, help="iterations not timed")
    p.add_argument("--repeats", type=int, default=2, help="runs of each side (best counts)")
    p.add_argument("--no-write", action="store_true", help="print, do not update docs/benchmarks.md")
    args = p.parse_args(argv)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    load_before = os.getloadavg()[0]

    plain, engine = [], []
    for r in range(args.repeats):
        plain.append(run_plain(args.iters, args.warmup, cores))
        print(f"plain loop run {r + 1}: {plain[-1]:.1f} tokens/s", flush=True)
        tps, log = run_pretrain(1, 1, args.iters, args.warmup, cores)
        engine.append(tps)
        print(f"pretrain_tokenformer.py (1,1,1) run {r + 1}: {tps:.1f} tokens/s", flush=True)
    tp1, tp2 = [], []
    for r in range(args.repeats):
        tp1.append(engine[r] if r < len(engine) else run_pretrain(1, 1, args.iters, args.warmup, cores)[0])
        tps, _ = run_pretrain(2, 2, args.iters, args.warmup, 1)
        tp2.append(tps)
        print(f"pretrain_tokenformer.py TP=2 on 2 ranks run {r + 1}: {tps:.1f} tokens/s", flush=True)
    fwd, bwd = collective_counts(2)
    load_after = os.getloadavg()[0]

    best_plain, best_engine, best_tp1, best_tp2 = max(plain), max(engine), max(tp1), max(tp2)
    ratio = best_engine / best_plain
    fs, bs = _summarise(fwd), _summarise(bwd)
    d, T, b = MODEL["hidden_size"], MODEL["seq_length"], MBS
    unit = b * T * d
    lines = []
    for kind in ("all_reduce", "reduce_scatter", "all_gather", "all_reduce_max"):
        if kind in fs or kind in bs:
            fc, fe = fs.get(kind, (0, 0))
            bc, be = bs.get(kind, (0, 0))
            lines.append(f"| {kind} | {fc} | {fe / unit:.2f} | {bc} | {be / unit:.2f} |")
    import torch
    body = f"""
`python benchmarks/train_overhead.py` on {platform.machine()} with {cores} CPU cores (torch {torch.__version__},
python {platform.python_version()}); load average (1 min) {load_before:.1f} before, {load_after:.1f} after.
Model: Tokenformer, {MODEL['num_layers']} layers, d = {d}, {MODEL['num_attention_heads']} heads, sequence {T},
{MODEL['qkv_num_param_tokens']} Q/K/V and output parameter tokens, {MODEL['ffn_num_param_tokens']} FFN tokens,
vocabulary {TEXT_VOCAB + 1}; micro-batch {MBS}, global batch {GBS} (2 accumulation steps), fp32, AdamW, clipping
{CLIP}. {args.iters} iterations per run, the first {args.warmup} not timed; best of {args.repeats} interleaved runs.

| what | tokens/s | ratio |
| --- | ---: | ---: |
| plain PyTorch loop (same model class, torch AdamW, clip, same mock batches), {cores} threads | {best_plain:,.0f} | 1.00 |
| `pretrain_tokenformer.py` at (TP, PP, DP) = (1,1,1): DeepSpeed engine, ZeRO-1, LR schedule, logging, {cores} threads | {best_engine:,.0f} | {ratio:.2f} (goal >= 0.90) |

Runs: plain {', '.join(f'{x:,.0f}' for x in plain)}; pretrain {', '.join(f'{x:,.0f}' for x in engine)} tokens/s.

Tensor parallelism on the same {cores} cores (pretrain_tokenformer.py, same model and batches):

| layout | tokens/s | ratio |
| --- | ---: | ---: |
| TP = 1: 1 rank x {cores} threads | {best_tp1:,.0f} | 1.00 |
| TP = 2: 2 ranks x 1 thread (gloo) | {best_tp2:,.0f} | {best_tp2 / best_tp1:.2f} |

Collectives TP = 2 issues per micro-batch (counted with `tensor_parallel.count_collectives` on the
real model; elements per rank in units of b·T·d = {b}·{T}·{d}; forward, then backward):

| collective | forward calls | forward b·T·d | backward calls | backward b·T·d |
| --- | ---: | ---: | ---: | ---: |
{chr(10).join(lines)}

On 2 cores TP = 2 cannot be faster than one process using both cores for its matmuls: it splits
the same arithmetic over the same cores and adds the collectives above (through gloo, i.e. memory
copies on one host). What it buys is memory per rank and the ability to span GPUs; the CPU figure
measures the added communication cost, not a speed-up.
"""
    print(body)
    if not args.no_write:
        write_section(os.path.join(ROOT, "docs", "benchmarks.md"), body)
        print("updated docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
