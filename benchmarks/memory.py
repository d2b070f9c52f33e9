#!/usr/bin/env python
"""Activation memory: the memory-lean Pattention function, sequence parallelism, recomputation (issue 10).

    python benchmarks/memory.py              # prints the tables; --write puts them into docs/benchmarks.md

1. One Pattention (T = 2048 tokens, d = 512, n = 2048) against the equal-shape Linear-GeLU-Linear MLP
   (d -> n -> d, no biases): bytes kept for backward, fp32 and bf16, for the memory-lean function and
   the autograd composition it replaced; forward+backward time on CPU (fp32, best of interleaved repeats).
2. One block per rank per micro-batch, Tokenformer against the baseline Transformer at equal parameters
   (Tokenformer n_qkv = n_o = h, n_ffn = 2h: 12 h^2 per layer, as the Transformer's f = 4h), TP 1 and 2,
   with and without --sequence-parallel, no / selective / full recomputation, fp32; next to the closed-form
   formula of docs/benchmarks.md ("Activation memory").

"Retained bytes" = every storage created during the forward that is still referenced once the forward
has returned (by autograd's saved tensors or by a checkpoint holding its inputs), the output excluded,
each storage counted once (a TorchDispatchMode records the storages, their reference counts tell which
survive). With a GPU, torch.cuda.max_memory_allocated is not used here: everything runs on CPU.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

SECTION = "## Activation memory (issue 10)"


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.storages = {}
        self.names = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):  # storages this op allocated (not views of its inputs, e.g. parameters)
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in inputs:
                s = t.untyped_storage()
                self.storages.setdefault(s._cdata, s)
                self.names.setdefault(s._cdata, f"{func}{tuple(t.shape)}{t.dtype}")
        return out


def retained_bytes(fn) -> int:
    """Bytes of the storages created by ``fn()`` that its output's graph keeps alive (output excluded)."""
    rec = _Recorder()
    with rec:
        out = fn()
    exclude = {t.untyped_storage()._cdata for t in tree_leaves(out) if isinstance(t, torch.Tensor)}
    gc.collect()
    total = 0
    for cdata, s in rec.storages.items():
        if cdata not in exclude and torch._C._storage_Use_Count(cdata) > 1:  # someone besides us holds it
            total += s.nbytes()
            if os.environ.get("MEMORY_DEBUG"):
                print("  retained", s.nbytes(), rec.names[cdata], file=sys.stderr)
    del out
    return total


# --------------------------------------------------------------------------- 1. Pattention vs MLP
def pattention_vs_mlp(T=2048, d=512, n=2048, repeats=5):
    from megatron_tokenformer.ops.pattention_norm import pattention_normalize_combine

    g = torch.Generator().manual_seed(0)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(T, d, generator=g).to(dtype).requires_grad_()
        keys = (torch.randn(n, d, generator=g) * 0.02).to(dtype).requires_grad_()
        values = (torch.randn(n, d, generator=g) * 0.02).to(dtype).requires_grad_()
        w1 = (torch.randn(n, d, generator=g) * 0.02).to(dtype).requires_grad_()
        w2 = (torch.randn(d, n, generator=g) * 0.02).to(dtype).requires_grad_()

        def patt(lean, fused=False):
            return lambda: pattention_normalize_combine([F.linear(x, keys)], [values], "l2_norm_gelu",
                                                        [n ** 0.5], [n], lean=lean, fused=fused)[0]

        def mlp():
            return F.linear(F.gelu(F.linear(x, w1)), w2)

        # (the fused kernels keep the same tensors -- tests/unit/ops/test_pattention_norm_fused.py -- and
        # torch.compile does not run under the recording dispatch mode, so they are timed, not measured)
        sizes = {"lean": retained_bytes(patt(True)), "autograd": retained_bytes(patt(False)),
                 "mlp": retained_bytes(mlp)}
        rows.append((str(dtype).replace("torch.", ""), sizes))
        if dtype == torch.float32:
            times = {"lean": [], "fused": [], "autograd": [], "mlp": []}
            fns = {"lean": patt(True), "fused": patt(True, True), "autograd": patt(False), "mlp": mlp}
            fns["fused"]().sum().backward()  # compile outside the timed repeats
            for _ in range(repeats):
                for name, fn in fns.items():
                    t0 = time.perf_counter()
                    fn().sum().backward()
                    times[name].append(time.perf_counter() - t0)
            best = {k: min(v) for k, v in times.items()}
    return rows, best


# --------------------------------------------------------------------------- 2. per-block activations
def block_formula(kind, s, b, h, a, t, sp, recompute, n_qkv=None, n_o=None, n_f=None, f=None, rotary=True,
                  elem=4, softmax=False):
    """Closed-form retained bytes of one block per rank (docs/benchmarks.md, "Activation memory")."""
    m = s * b // t if sp else s * b           # rows of the residual stream on this rank
    sb = s * b
    if recompute == "full":
        return elem * m * h
    ln = 2 * (4 * m * h + 8 * m)             # LayerNorm inputs (fp32) + mean/rstd (fp32), twice
    heads = elem * sb * h // t               # one [b, s, h/t] tensor (this rank's heads)
    qkv = 3 * heads                          # this rank's Q, K, V (one storage)
    selective = recompute == "selective"
    core = 0 if selective else (2 * heads if rotary else 0) + 4 * b * s * a // t  # rotated q, k; SDPA lse
    if kind == "tokenformer":
        inputs = 2 * elem * m * h             # inputs of Q/K/V (shared) and of the FFN Pattention (SP: the chunk)
        out_in = elem * sb * h if t > 1 else heads  # output Pattention input: the all-gathered heads
        sdpa_out = heads if (t > 1 and not selective) else 0  # (at TP 1 the SDPA output itself)
        scores = elem * sb * (3 * n_qkv + n_o + n_f) // t
        stats = 4 * 5 * sb * (2 if softmax else 1)
        return ln + inputs + out_in + sdpa_out + scores + stats + qkv + core
    inputs = 2 * elem * m * h                 # inputs of Q/K/V (shared) and fc1 (SP: the local chunk)
    dense_in = heads                          # the SDPA output, input of the row-parallel dense
    mlp = 2 * elem * sb * f // t              # fc1 output (GeLU input) and GeLU output
    wcat = elem * 3 * h * h // t              # the concatenated Q/K/V weight (a new tensor each forward)
    return ln + inputs + dense_in + mlp + wcat + qkv + core


SHAPE = dict(s=256, b=2, h=256, a=8)
MODES = [(False, None), (False, "selective"), (False, "full"), (True, None), (True, "selective"), (True, "full")]


def _block_measurements(tp):
    from megatron_tokenformer.config import ModelConfig
    from megatron_tokenformer.model.block import TokenformerBlock
    from megatron_tokenformer.model.language_model import prepare_config
    from megatron_tokenformer.model.recompute import checkpointed
    from megatron_tokenformer.model.transformer import TransformerBlock, transformer_config

    s, b, h, a = SHAPE["s"], SHAPE["b"], SHAPE["h"], SHAPE["a"]
    results = []
    for sp, recompute in MODES:
        if sp and tp == 1:
            continue
        common = dict(num_layers=2, hidden_size=h, num_attention_heads=a, seq_length=s, vocab_size=128,
                      sequence_parallel=sp, recompute_granularity="selective" if recompute == "selective" else None)
        for kind in ("tokenformer", "transformer"):
            if kind == "tokenformer":
                cfg = prepare_config(ModelConfig(qkv_num_param_tokens=h, proj_num_param_tokens=h,
                                                 ffn_num_param_tokens=2 * h, **common))
                block = TokenformerBlock(cfg, 1)
            else:
                cfg = prepare_config(transformer_config(**common))
                block = TransformerBlock(cfg, 1)
            x = torch.randn(b, s // tp if sp else s, h, requires_grad=True)
            block(x)  # warm-up (rotary cache)

            def run():
                inp = x * 1.0  # the block input, created inside the measured region
                return checkpointed(block, inp) if recompute == "full" else block(inp)

            measured = retained_bytes(run)
            kw = dict(n_qkv=h, n_o=h, n_f=2 * h) if kind == "tokenformer" else dict(f=4 * h)
            formula = block_formula(kind, s, b, h, a, tp, sp, recompute, **kw)
            results.append((kind, tp, sp, recompute or "none", measured, formula))
    return results


def _tp_worker(rank, world, path):
    from megatron_tokenformer import parallel_state
    parallel_state.initialize_model_parallel(world)
    results = _block_measurements(world)
    if rank == 0:
        torch.save(results, path)


def block_table():
    results = _block_measurements(1)
    from megatron_tokenformer.testing import spawn_gloo
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tp2.pt")
        spawn_gloo(_tp_worker, 2, path)
        results += torch.load(path)
    return results


def _goals(rows, best) -> str:
    mem = max(sz["lean"] / sz["mlp"] for _, sz in rows)
    t, tf = best["lean"] / best["mlp"], best["fused"] / best["mlp"]
    return (f"Goals of issue 10: saved bytes <= 1.0x the MLP in fp32 and bf16: {'met' if mem <= 1.0 else 'NOT met'} "
            f"({mem:.2f}x at most; the fused kernels keep the same tensors); fwd+bwd time <= 1.10x the MLP: "
            "with the fused "
            f"kernels (`--fused-pattention-norm`) {'met' if tf <= 1.10 else 'NOT met'} ({tf:.2f}x), with the plain "
            f"eager kernels (the CPU default) {'met' if t <= 1.10 else 'NOT met'} ({t:.2f}x: the backward recomputes "
            "the normalisation in several eager passes over T x n). The matmuls are the same as the MLP's. Timings "
            "come from a shared 2-core machine and move by tens of percent between runs.")


def render(rows, best, blocks) -> str:
    mib = 2 ** 20
    out = [SECTION, "",
           "Produced by `python benchmarks/memory.py --write` (CPU, fp32 unless stated). Method: the bytes of every",
           "storage created during the forward that is still referenced afterwards (autograd's saved tensors, or",
           "a checkpoint's inputs), each storage once, the output and the parameters excluded.", "",
           "**One Pattention vs the equal-shape MLP** (T = 2048, d = 512, n = 2048, l2_norm_gelu; MLP = Linear",
           "d -> n, exact GeLU, Linear n -> d, no biases):", "",
           "| dtype | lean function (MiB) | autograd composition (MiB) | MLP (MiB) | lean / MLP | autograd / MLP |",
           "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for dtype, sz in rows:
        out.append(f"| {dtype} | {sz['lean'] / mib:.2f} | {sz['autograd'] / mib:.2f} | {sz['mlp'] / mib:.2f} | "
                   f"{sz['lean'] / sz['mlp']:.2f} | {sz['autograd'] / sz['mlp']:.2f} |")
    out += ["", f"Forward + backward, CPU fp32, best of interleaved repeats (compilation excluded): lean "
                f"{best['lean'] * 1e3:.0f} ms, lean with fused kernels {best['fused'] * 1e3:.0f} ms, autograd "
                f"composition {best['autograd'] * 1e3:.0f} ms, MLP {best['mlp'] * 1e3:.0f} ms: fused / MLP = "
                f"**{best['fused'] / best['mlp']:.2f}**, lean / MLP = {best['lean'] / best['mlp']:.2f}, "
                f"autograd / MLP = {best['autograd'] / best['mlp']:.2f}.",
            "", _goals(rows, best),
            "", "**One block per rank per micro-batch** (s = {s}, b = {b}, h = {h}, a = {a};"
                " Tokenformer n_qkv = n_o = h,"
                " n_ffn = 2h; Transformer f = 4h; both 12 h^2 parameters per layer), measured against the"
                " formula:".format(**SHAPE), "",
            "| model | TP | sequence parallel | recompute | measured (MiB) | formula (MiB) | measured / formula |"
            " Tokenformer / Transformer |",
            "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: |"]
    by_key = {(k, tp, sp, rc): (m, f) for k, tp, sp, rc, m, f in blocks}
    for k, tp, sp, rc, m, f in blocks:
        ratio = f"{m / by_key[('transformer', tp, sp, rc)][0]:.2f}" if k == "tokenformer" else ""
        out.append(f"| {k} | {tp} | {'yes' if sp else 'no'} | {rc} | {m / mib:.2f} | {f / mib:.2f} | {m / f:.3f} | "
                   f"{ratio} |")
    return "\n".join(out) + "\n"


def write_section(text: str, section: str = SECTION) -> None:
    """Replace ``section`` (its heading line) of docs/benchmarks.md with ``text``, or append it."""
    path = os.path.join(ROOT, "docs", "benchmarks.md")
    doc = open(path).read()
    if section in doc:
        start = doc.index(section)
        nxt = doc.find("\n## ", start + len(section))
        doc = doc[:start] + text + (doc[nxt + 1:] if nxt != -1 else "")
    else:
        doc = doc.rstrip("\n") + "\n\n" + text
    open(path, "w").write(doc)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help="replace the section in docs/benchmarks.md")
    parser.add_argument("--repeats", type=int, default=5, help="timing repeats (interleaved; best counts)")
    args = parser.parse_args(argv)
    rows, best = pattention_vs_mlp(repeats=args.repeats)
    text = render(rows, best, block_table())
    print(text)
    if args.write:
        write_section(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
