#!/usr/bin/env python
"""The paper's long-context argument, measured: a grown Tokenformer against a Net2Net-widened Transformer
of the same parameter count, at growing sequence length.

Growing a Transformer widens d, so its token-token attention (4 T d FLOPs per token and layer) grows with
it; growing a Tokenformer adds parameter tokens and leaves d alone. For the two x4 models of
examples/progressive_scaling/cpu_repro.sh (defaults: the grown Tokenformer L = 4, d = 128, 256/256/1024
tokens; the Net2Net-widened Transformer L = 4, d = 256, 8 heads, MLP 384; vocabulary 2048):

1. forward FLOPs per token from megatron_tokenformer/training/flops.py at each sequence length, the
   attention share, and the crossover length where the two are equal (both are linear in T);
2. measured training tokens/s (forward + backward + AdamW step, one sample per step, fp32, plain
   PyTorch on this machine's CPU threads), both models in the same invocation, alternating, so the
   ratio is taken under the same load.

Writes the section "## Long context: grown Tokenformer vs Net2Net Transformer (issue 11)" of
docs/benchmarks.md unless --no-write.

    python benchmarks/long_context.py [--seqs 512 2048 8192] [--steps 2] [--threads 2] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SECTION = "## Long context: grown Tokenformer vs Net2Net Transformer (issue 11)"


def configs(seq: int, args):
    from megatron_tokenformer.config import ModelConfig
    n = args.n_small * args.growth
    tokenformer = ModelConfig(num_layers=args.layers, hidden_size=args.d, num_attention_heads=args.heads,
                              seq_length=seq, vocab_size=args.vocab, qkv_num_param_tokens=n,
                              proj_num_param_tokens=n, ffn_num_param_tokens=4 * n,
                              qkv_tau=(args.n_small ** 0.5), proj_tau=(args.n_small ** 0.5),
                              ffn_tau=((4 * args.n_small) ** 0.5))  # a grown model keeps the small tau
    transformer = ModelConfig(num_layers=args.layers, hidden_size=args.wide_d,
                              num_attention_heads=args.heads * args.wide_d // args.d, seq_length=seq,
                              vocab_size=args.vocab, qkv_num_param_tokens=1, proj_num_param_tokens=1,
                              ffn_num_param_tokens=1, model_type="transformer", ffn_hidden_size=args.wide_ffn,
                              block_layernorm="parametric")
    return {"Tokenformer grown": tokenformer.resolve_taus(), "Transformer Net2Net": transformer.resolve_taus()}


def forward_flops(config) -> float:
    from megatron_tokenformer.training.flops import training_flops_per_token
    return training_flops_per_token(config, config.padded_vocab_size(1), recompute=False) / 3.0


def attention_flops(config) -> float:
    return config.num_layers * 4 * config.seq_length * config.hidden_size


def crossover(cfgs) -> float:
    """T where the two forward FLOPs per token are equal (both are a + b T)."""
    (a1, b1), (a2, b2) = [(forward_flops(c) - attention_flops(c), attention_flops(c) / c.seq_length)
                          for c in cfgs.values()]
    return (a2 - a1) / (b1 - b2) if b1 != b2 else float("inf")


def make_model(config):
    from megatron_tokenformer.model import GPTModel  # builds the baseline blocks for model_type transformer
    return GPTModel(config)


def time_steps(model, seq: int, vocab: int, steps: int) -> float:
    """CPU seconds of this process per training step (one sample of ``seq`` tokens), after one warm-up step.

    Process CPU time, not wall time: on a shared machine the wall clock counts the time other processes
    held the cores; with one thread the CPU time is the work done (the torch threads are this process's)."""
    import torch
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (1, seq + 1), generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(x, y)
        loss = loss.mean() if loss.dim() else loss
        loss.backward()
        opt.step()

    step()
    t0 = time.process_time()
    for _ in range(steps):
        step()
    return (time.process_time() - t0) / steps


def measured_crossover(measured, names) -> str:
    """Where the measured speed ratio (Tokenformer / Transformer tokens per CPU-s) crosses 1: linear in
    log2(T) between the two lengths that bracket it."""
    import math
    ratios = [(seq, tps[names[0]] / tps[names[1]]) for seq, tps in measured]
    for (t0, r0), (t1, r1) in zip(ratios, ratios[1:]):
        if (r0 - 1) * (r1 - 1) <= 0 and r0 != r1:
            t = 2 ** (math.log2(t0) + (math.log2(t1) - math.log2(t0)) * (1 - r0) / (r1 - r0))
            faster = names[0] if r1 > r0 else names[1]
            return (f"Measured, the crossover lies between T = {t0} and {t1} (about T = {t:.0f}, interpolating the "
                    f"speed ratio in log T): above it the {faster} trains more tokens per CPU-second. Below it the "
                    "Transformer's few large matrix products run faster per FLOP on this CPU than the Tokenformer's "
                    "Pattentions (norm, GeLU and the extra score matrices are memory-bound work the FLOP count "
                    "leaves out).")
    return ("Measured, the speed ratio does not cross 1 between the lengths run (" +
            ", ".join(f"T = {t}: {r:.2f}" for t, r in ratios) + ").")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqs", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--steps", type=int, default=2, help="timed steps per model and length (after one warm-up)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (CPU time is summed over them)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--n-small", type=int, default=64)
    p.add_argument("--growth", type=int, default=4)
    p.add_argument("--wide-d", type=int, default=256)
    p.add_argument("--wide-ffn", type=int, default=384)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if any(s < 1 for s in args.seqs) or args.steps < 1 or args.threads < 1:
        p.error("--seqs, --steps and --threads must be positive")
    import torch
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    rows, measured = [], []
    for seq in args.seqs:
        cfgs = configs(seq, args)
        row = {"seq": seq}
        for name, cfg in cfgs.items():
            row[name] = (forward_flops(cfg), attention_flops(cfg) / forward_flops(cfg))
        rows.append(row)
    params = {}
    for name, cfg in configs(args.seqs[0], args).items():
        params[name] = sum(q.numel() for q in make_model(cfg).parameters())
    t_cross = crossover(configs(args.seqs[0], args))
    for seq in args.seqs:
        cfgs = configs(seq, args)
        models = {name: make_model(cfg) for name, cfg in cfgs.items()}
        times = {name: time_steps(m, seq, args.vocab, args.steps) for name, m in models.items()}
        measured.append((seq, {name: seq / t for name, t in times.items()}))
        print(f"seq {seq}: " + ", ".join(f"{n} {seq / t:.0f} tokens per CPU-s" for n, t in times.items()), flush=True)
        del models

    names = list(params)
    lines = [f"`python benchmarks/long_context.py --seqs {' '.join(map(str, args.seqs))} --steps {args.steps} "
             f"--threads {args.threads}` on {os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d %H:%M')} "
             "(fp32, one sample per step, forward + backward + AdamW, plain PyTorch; tokens per CPU-second of the "
             "process, so a loaded machine slows the run but not the figures).", "",
             f"Models (the x{args.growth} models of examples/progressive_scaling/cpu_repro.sh): **{names[0]}** "
             f"L={args.layers} d={args.d} tokens {args.n_small * args.growth}/{args.n_small * args.growth}/"
             f"{4 * args.n_small * args.growth}, {params[names[0]]:,} parameters; **{names[1]}** L={args.layers} "
             f"d={args.wide_d} MLP={args.wide_ffn}, {params[names[1]]:,} parameters; vocabulary {args.vocab}.", "",
             "| sequence | forward FLOPs/token, Tokenformer (attention share) | forward FLOPs/token, Transformer "
             "(attention share) | FLOPs ratio T/TF | measured tokens per CPU-s, Tokenformer | "
             "measured tokens per CPU-s, Transformer | "
             "speed ratio TF/T |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for row, (seq, tps) in zip(rows, measured):
        (f1, s1), (f2, s2) = row[names[0]], row[names[1]]
        lines.append(f"| {seq} | {f1 / 1e6:.2f} M ({s1:.0%}) | {f2 / 1e6:.2f} M ({s2:.0%}) | {f2 / f1:.2f} | "
                     f"{tps[names[0]]:.0f} | {tps[names[1]]:.0f} | {tps[names[0]] / tps[names[1]]:.2f} |")
    if t_cross <= 0.5:
        cross = (f"The formula's crossover is at T = {max(0.0, t_cross):.0f}: at these sizes the grown "
                 "Tokenformer needs "
                 "fewer forward FLOPs per token than the widened Transformer at every sequence length, and the gap "
                 f"grows linearly with T (attention costs 4 T d per layer, d = {args.d} against {args.wide_d}).")
    else:
        cross = (f"The formula's crossover is at T = {t_cross:.0f}: below it the widened Transformer needs fewer "
                 "forward FLOPs per token, above it the grown Tokenformer does.")
    lines += ["", cross, "", measured_crossover(measured, names)]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        path = os.path.join(ROOT, "docs", "benchmarks.md")
        text = open(path, encoding="utf-8").read()
        block = SECTION + "\n\n" + body.strip() + "\n"
        start = text.find(SECTION)
        if start >= 0:
            nxt = text.find("\n## ", start + len(SECTION))
            text = text[:start] + block + ("\n" + text[nxt + 1:] if nxt >= 0 else "")
        else:
            text = text.rstrip("\n") + "\n\n" + block
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        print("updated docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
