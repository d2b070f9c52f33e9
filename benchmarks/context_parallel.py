#!/usr/bin/env python
"""Context parallelism measured (issue 23): activation memory per rank, throughput, the longest sequence in a
memory budget, and the communication of one layer.

    python benchmarks/context_parallel.py            # prints the tables; --write puts them into docs/benchmarks.md

One Tokenformer block (h = 64, 4 heads, rotary on a quarter of each head, n_qkv = n_o = h, n_ffn = 2h, b = 1,
fp32) per rank, on CP spawned gloo CPU ranks (one thread each):

1. activation memory per rank at CP 1, 2, 4 for sequences 4096 and 16384 (the bytes kept for backward,
   measured by storage as benchmarks/memory.py does) against the closed-form formula of docs/design.md;
2. tokens per CPU-second of the block's forward + backward at CP 2 against CP 1 at the same sequence (CPU
   time summed over the ranks: what the split costs, not what the extra cores buy);
3. the longest sequence (multiple of 1024) whose block activations fit a per-rank budget (--budget-mib) at CP
   1, 2 and 4, from the formula, confirmed by measuring at that length;
4. communication per layer and rank: the context-parallel collectives counted at the choke point
   (tensor_parallel/mappings.count_collectives("context")) in one forward + backward, against the formula.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

SECTION = "## Context parallelism (issue 23)"
H, HEADS, B, E = 64, 4, 1, 4


def _memory_module():
    spec = importlib.util.spec_from_file_location("_memory_bench", os.path.join(ROOT, "benchmarks", "memory.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config(seq):
    from megatron_tokenformer.config import TokenformerConfig
    from megatron_tokenformer.model.language_model import prepare_config
    return prepare_config(TokenformerConfig(num_layers=2, hidden_size=H, num_attention_heads=HEADS, seq_length=seq,
                                            vocab_size=128, qkv_num_param_tokens=H, proj_num_param_tokens=H,
                                            ffn_num_param_tokens=2 * H))


def formula_bytes(s, cp, h=H, a=HEADS, b=B, e=E, rotary_dim=4, n_qkv=H, n_o=H, n_f=2 * H):
    """Closed-form bytes one Tokenformer block keeps for backward per rank (TP 1, no recomputation;
    docs/design.md, "Context parallelism")."""
    scores = e * (3 * n_qkv + n_o + n_f)
    if cp == 1:  # §9's formula at t = 1: LN + inputs + SDPA output + scores + stats + Q/K/V + rotated q, k + lse
        m = s * b
        return 2 * (4 * m * h + 8 * m) + 2 * e * m * h + e * m * h + scores * m + 20 * m + 3 * e * m * h \
            + 2 * e * m * h + 4 * b * s * a
    m = s * b // cp  # this rank's tokens
    return (2 * (4 * m * h + 8 * m)          # both LayerNorms' inputs and statistics (fp32)
            + 2 * e * m * h                  # inputs of the Q/K/V and FFN Pattentions
            + e * m * h                      # attention output = input of the output Pattention
            + scores * m + 20 * m            # Pattention scores and row statistics
            + e * m * h                      # rotated q
            + 2 * e * s * b * h              # K, V of the WHOLE sequence (gathered, position order)
            + 4 * b * a * m                  # log-sum-exp, fp32
            + 8 * s                          # the position-order index of the gathered K, V (int64)
            + 2 * 4 * m * rotary_dim)        # cos, sin at this rank's global positions (fp32)


def measure_on_rank(seq, time_it=False):
    """On a rank of an initialised context-parallel group: one block's retained bytes, the counted
    context-parallel collectives of a forward + backward, and (``time_it``) its best CPU time of 3."""
    from megatron_tokenformer import parallel_state
    from megatron_tokenformer.model.block import TokenformerBlock
    from megatron_tokenformer.tensor_parallel.mappings import count_collectives

    memory = _memory_module()
    block = TokenformerBlock(_config(seq), 1)
    cp, rank = parallel_state.get_context_parallel_world_size(), parallel_state.get_context_parallel_rank()
    x = torch.randn(B, seq // cp, H, generator=torch.Generator().manual_seed(rank), requires_grad=True)
    block(x).sum().backward()  # warm-up (rotary tables)
    retained = memory.retained_bytes(lambda: block(x * 1.0))
    with count_collectives("context") as log:
        block(x).sum().backward()
    cpu = None
    if time_it:
        times = []
        for _ in range(3):
            t0 = time.process_time()
            block(x).sum().backward()
            times.append(time.process_time() - t0)
        cpu = min(times)
    return {"retained": retained, "log": log, "cpu": cpu}


def _measure(rank, world, seq, out_dir, time_it):
    from megatron_tokenformer import parallel_state
    torch.set_num_threads(1)
    parallel_state.initialize_model_parallel(1, 1, world)
    torch.save(measure_on_rank(seq, time_it), os.path.join(out_dir, f"rank{rank}.pt"))


def measure(seq, cp, time_it=False):
    """{"retained": bytes (rank 0), "log": rank 0's counted collectives, "cpu": CPU s summed over ranks}."""
    from megatron_tokenformer.testing import spawn_gloo
    with tempfile.TemporaryDirectory() as tmp:
        spawn_gloo(_measure, cp, seq, tmp, time_it)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(cp)]
    return {"retained": ranks[0]["retained"], "log": ranks[0]["log"],
            "cpu": sum(r["cpu"] for r in ranks) if time_it else None}


def longest_in_budget(cp, budget):
    s, step = 0, 1024
    while formula_bytes(s + step, cp) <= budget:
        s += step
    return s


def render(memory_rows, speed, budget_rows, comm_rows, budget_mib) -> str:
    mib = 2 ** 20
    out = [SECTION, "",
           "Produced by `python benchmarks/context_parallel.py --write` (CPU, gloo, one thread per rank, fp32). One",
           f"Tokenformer block, h = {H}, {HEADS} heads (rotary on 4 of 16 channels), n_qkv = n_o = h, "
           "n_ffn = 2h, micro-",
           "batch 1, TP 1, no recomputation; the all-gather form (K, V gathered over CP, dK, dV reduce-scattered).", "",
           "**Activation memory per rank** (bytes kept for backward, by storage, as `benchmarks/memory.py`), against",
           "the formula of docs/design.md (\"Context parallelism\"):", "",
           "| sequence | CP | measured (MiB) | formula (MiB) | measured / formula | of which gathered K, V (MiB) "
           "| vs CP 1 |",
           "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    base = {s: m for s, cp, m, f in memory_rows if cp == 1}
    for s, cp, m, f in memory_rows:
        kv = 2 * E * s * B * H if cp > 1 else 0
        out.append(f"| {s} | {cp} | {m / mib:.2f} | {f / mib:.2f} | {m / f:.3f} | {kv / mib:.2f} | {m / base[s]:.2f} |")
    s, cpu1, cpu2 = speed
    out += ["", "Read: every term falls by CP except the gathered K, V of the whole sequence (and its position "
                "index), so the saving flattens with CP: at CP 4 they are 40% of what a rank keeps here. That term "
                "is what a ring (K, V passed around, O(s/cp)) would remove."]
    out += ["", f"**Throughput** at sequence {s} (forward + backward of the block, best of 3, CPU seconds summed "
                f"over the ranks): CP 1 {s / cpu1:,.0f} tokens per CPU-second, CP 2 {s / cpu2:,.0f}: CP 2 / CP 1 = "
                f"**{cpu1 / cpu2:.2f}** (the split adds the K, V gather and a second flash-kernel call per query "
                "chunk, "
                "merged by log-sum-exp; the causal work per rank is balanced).",
            "", f"**Longest sequence in a per-rank budget of {budget_mib} MiB** (one block's activations; the "
                "formula, "
                "confirmed by measuring at that length):", "",
            "| CP | longest sequence | measured there (MiB) | formula at +1024 (MiB) |",
            "| ---: | ---: | ---: | ---: |"]
    for cp, s, m in budget_rows:
        out.append(f"| {cp} | {s} | {m / mib:.2f} | {formula_bytes(s + 1024, cp) / mib:.2f} |")
    out += ["", "**Communication per layer and rank** (counted at the choke point in one forward + backward; elements "
                "handed to the collective, fp32; the formula: all-gather of this rank's K, V, 2·b·(s/cp)·h, and "
                "reduce-scatter of the gathered gradient, 2·b·s·h; each moves 2·b·s·h·(cp−1)/cp elements per rank "
                "on a ring):", "",
            "| sequence | CP | counted | formula | ring traffic per rank (MiB, forward + backward) |",
            "| ---: | ---: | --- | --- | ---: |"]
    for s, cp, counted, formula in comm_rows:
        ring = 2 * 2 * B * s * H * (cp - 1) / cp * E
        out.append(f"| {s} | {cp} | {counted} | {formula} | {ring / mib:.2f} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help="replace the section in docs/benchmarks.md")
    parser.add_argument("--seqs", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--speed-seq", type=int, default=4096)
    parser.add_argument("--budget-mib", type=int, default=32)
    args = parser.parse_args(argv)
    memory_rows, comm_rows = [], []
    for s in args.seqs:
        for cp in (1, 2, 4):
            r = measure(s, cp)
            memory_rows.append((s, cp, r["retained"], formula_bytes(s, cp)))
            if cp > 1:
                want = [("all_gather", 2 * B * s // cp * H), ("reduce_scatter", 2 * B * s * H)]
                assert r["log"] == want, (r["log"], want)
                comm_rows.append((s, cp, ", ".join(f"{k} {n:,}" for k, n in r["log"]),
                                  ", ".join(f"{k} {n:,}" for k, n in want)))
            print(memory_rows[-1], file=sys.stderr, flush=True)
    cpu1 = measure(args.speed_seq, 1, time_it=True)["cpu"]
    cpu2 = measure(args.speed_seq, 2, time_it=True)["cpu"]
    budget = args.budget_mib * 2 ** 20
    budget_rows = []
    for cp in (1, 2, 4):
        s = longest_in_budget(cp, budget)
        budget_rows.append((cp, s, measure(s, cp)["retained"]))
        print(budget_rows[-1], file=sys.stderr, flush=True)
    text = render(memory_rows, (args.speed_seq, cpu1, cpu2), budget_rows, comm_rows, args.budget_mib)
    print(text)
    if args.write:
        _memory_module().write_section(text, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
