#!/usr/bin/env python
"""Turn the training logs of a progressive-scaling experiment into a Markdown report and a plot.

    python examples/progressive_scaling/report.py --output docs/progressive_scaling.md \\
        --plot docs/progressive_scaling.png \\
        --arm "Tokenformer grown=logs/small.log,logs/grown.log" --arm "Tokenformer from scratch=logs/big.log"

An ARM is one line in the plot: a name and the logs of its stages in order (a stage resumes where the
previous one stopped). From each log (pretrain_tokenformer.py's output) it reads the arguments block,
the parameter summary, the validation lines and the final ``> done`` line. Training FLOPs are the
model FLOPs of megatron_tokenformer/training/flops.py (3 x forward, no recomputation) times the tokens
of every iteration, summed over the stages; the padded vocabulary is the embedding count of the
parameter summary divided by the hidden size.

Writes the report (table per arm and per stage, what the numbers show, how the comparison was set up)
and a PNG of validation loss against cumulative training FLOPs (matplotlib, Agg backend).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import re
import sys
import types
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

_ARG_LINE = re.compile(r"^\s{2}(\w+) \.{2,} (.*)$")
_PARAMS = re.compile(r"^number of parameters: ([\d,]+)")
_EMBEDDING = re.compile(r"^\s+embedding\s+([\d,]+)\s*$")
_START = re.compile(r"^> training from iteration (\d+) to (\d+)")
_EVAL = re.compile(r"validation(?: \(end of training\))? loss at iteration (\d+) \| lm loss value: ([-+\d.eE]+) \|")
_DONE = re.compile(r"^> done: iteration (\d+), (\d+) samples consumed \(([^)]*)\); total time ([\d.]+) s")


class ReportError(ValueError):
    """A log is missing something the report needs (message names the file)."""


@dataclass
class Stage:
    path: str
    args: Dict[str, str]
    parameters: int
    padded_vocab: int
    start: int
    end: int
    seconds: float
    evals: List[Tuple[int, float]]
    flops_per_iteration: float = 0.0

    def arg(self, name: str) -> str:
        if name not in self.args:
            raise ReportError(f"{self.path}: the arguments block has no {name!r}")
        return self.args[name]


@dataclass
class Arm:
    name: str
    stages: List[Stage]
    points: List[Tuple[float, float, int]] = field(default_factory=list)  # (cumulative FLOPs, val loss, iteration)

    @property
    def total_flops(self) -> float:
        return sum((s.end - s.start) * s.flops_per_iteration for s in self.stages)

    @property
    def final_loss(self) -> float:
        return self.points[-1][1]


def parse_log(path: str) -> Stage:
    if not os.path.isfile(path):
        raise ReportError(f"{path}: no such log")
    args: Dict[str, str] = {}
    parameters = embedding = start = None
    done = None
    evals: Dict[int, float] = {}
    in_args = False
    with open(path, errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if "------------------------ arguments ------------------------" in line:
                in_args = True
                continue
            if "end of arguments" in line:
                in_args = False
                continue
            if in_args:
                m = _ARG_LINE.match(line)
                if m:
                    args[m.group(1)] = m.group(2).strip()
                continue
            m = _PARAMS.match(line)
            if m and parameters is None:
                parameters = int(m.group(1).replace(",", ""))
                continue
            m = _EMBEDDING.match(line)
            if m and embedding is None:
                embedding = int(m.group(1).replace(",", ""))
                continue
            m = _START.match(line)
            if m:
                start = int(m.group(1))
                continue
            m = _EVAL.search(line)
            if m:
                evals[int(m.group(1))] = float(m.group(2))
                continue
            m = _DONE.match(line)
            if m:
                done = (int(m.group(1)), float(m.group(4)))
    missing = [what for what, value in (("the arguments block", args), ("'number of parameters'", parameters),
                                        ("the embedding count", embedding), ("'> training from iteration'", start),
                                        ("'> done:' (did the run finish?)", done)) if not value and value != 0]
    if missing:
        raise ReportError(f"{path}: not a complete pretrain_tokenformer.py log; missing {', '.join(missing)}")
    if not evals:
        raise ReportError(f"{path}: no validation loss lines (give --eval-iters > 0 and an --eval-interval the run "
                          "reaches)")
    hidden = int(args.get("hidden_size", "0"))
    if hidden <= 0 or embedding % hidden:
        raise ReportError(f"{path}: embedding count {embedding} is not a multiple of hidden_size {hidden}")
    return Stage(path, args, parameters, embedding // hidden, start, done[0], done[1], sorted(evals.items()))


def _int_or_none(text: str) -> Optional[int]:
    return None if text in ("None", "") else int(text)


def stage_flops_per_iteration(stage: Stage) -> float:
    from megatron_tokenformer.training.flops import training_flops_per_token
    config = types.SimpleNamespace(
        model_type=stage.args.get("model_type", "tokenformer"),
        num_layers=int(stage.arg("num_layers")), hidden_size=int(stage.arg("hidden_size")),
        seq_length=int(stage.arg("seq_length")),
        qkv_num_param_tokens=_int_or_none(stage.arg("qkv_num_param_tokens")),
        proj_num_param_tokens=_int_or_none(stage.arg("proj_num_param_tokens")),
        ffn_num_param_tokens=_int_or_none(stage.arg("ffn_num_param_tokens")),
        ffn_hidden_size=_int_or_none(stage.args.get("ffn_hidden_size", "None")),
        checkpoint_activations=stage.args.get("checkpoint_activations") == "True")
    per_token = training_flops_per_token(config, stage.padded_vocab, recompute=False)
    tokens = int(stage.arg("global_batch_size")) * config.seq_length
    return per_token * tokens


def build_arm(name: str, paths: List[str]) -> Arm:
    stages = [parse_log(p) for p in paths]
    arm = Arm(name, stages)
    cumulative = 0.0
    for i, stage in enumerate(stages):
        if i > 0 and stage.start != stages[i - 1].end:
            raise ReportError(f"arm {name!r}: {stage.path} starts at iteration {stage.start} but "
                              f"{stages[i - 1].path} ended at {stages[i - 1].end}; the stages do not connect")
        stage.flops_per_iteration = stage_flops_per_iteration(stage)
        for iteration, loss in stage.evals:
            arm.points.append((cumulative + (iteration - stage.start) * stage.flops_per_iteration, loss, iteration))
        cumulative += (stage.end - stage.start) * stage.flops_per_iteration
    return arm


# --------------------------------------------------------------------------- comparisons
def loss_at(arm: Arm, flops: float) -> Optional[float]:
    """The arm's validation loss at ``flops`` (linear interpolation between evaluations); None outside."""
    pts = arm.points
    for (f0, l0, _), (f1, l1, _) in zip(pts, pts[1:]):
        if f0 <= flops <= f1:
            return l0 if f1 == f0 else l0 + (l1 - l0) * (flops - f0) / (f1 - f0)
    if pts and math.isclose(flops, pts[-1][0], rel_tol=1e-9):
        return pts[-1][1]
    return None


def flops_to_reach(arm: Arm, loss: float) -> Optional[float]:
    """First cumulative FLOPs at which the arm's (interpolated) validation loss is <= ``loss``."""
    pts = arm.points
    if pts and pts[0][1] <= loss:
        return pts[0][0]
    for (f0, l0, _), (f1, l1, _) in zip(pts, pts[1:]):
        if l1 <= loss < l0:
            return f0 + (f1 - f0) * (l0 - loss) / (l0 - l1)
    return None


def compare(arm: Arm, reference: Arm) -> str:
    """One sentence pair: ``arm``'s final loss against ``reference`` at equal FLOPs, and the FLOPs
    ``reference`` needed to reach ``arm``'s final loss."""
    final, budget = arm.final_loss, arm.total_flops
    ref_same = loss_at(reference, budget)
    line = (f"**{arm.name}** ended at validation loss {final:.4f} after {budget:.3g} training FLOPs; ")
    if ref_same is not None:
        diff = final - ref_same
        verdict = "lower (better)" if diff < 0 else "higher (worse)"
        line += (f"**{reference.name}** had {ref_same:.4f} at the same FLOPs, so the loss is {abs(diff):.4f} "
                 f"{verdict} at equal training compute. ")
    else:
        line += (f"this is outside the range of **{reference.name}**'s evaluations "
                 f"({reference.points[0][0]:.3g} to {reference.points[-1][0]:.3g} FLOPs). ")
    needed = flops_to_reach(reference, final)
    if needed is None:
        line += f"{reference.name} never reached that loss (its final loss: {reference.final_loss:.4f})."
    else:
        line += (f"{reference.name} first reached that loss at {needed:.3g} FLOPs: the {arm.name} run needed "
                 f"{budget / needed:.2f}x those FLOPs.")
    return line


def default_pairs(arms: List[Arm]) -> List[Tuple[Arm, Arm]]:
    """Each arm without 'scratch' in its name against the 'scratch' arm of the same family (first word of
    the name), else the first 'scratch' arm."""
    scratch = [a for a in arms if "scratch" in a.name.lower()]
    pairs = []
    for arm in arms:
        if arm in scratch or not scratch:
            continue
        family = arm.name.split()[0].lower()
        same = [r for r in scratch if r.name.split()[0].lower() == family]
        pairs.append((arm, (same or scratch)[0]))
    return pairs


def findings(arms: List[Arm], pairs: List[Tuple[Arm, Arm]]) -> List[str]:
    out = [compare(arm, reference) for arm, reference in pairs]
    grown = [a for a in arms if len(a.stages) > 1]
    for i, a in enumerate(grown):  # grown arms against each other, at the smaller of their budgets
        for b in grown[i + 1:]:
            budget = min(a.total_flops, b.total_flops)
            la, lb = loss_at(a, budget), loss_at(b, budget)
            if la is not None and lb is not None:
                better, worse, lbest, lworse = (a, b, la, lb) if la <= lb else (b, a, lb, la)
                out.append(f"At {budget:.3g} training FLOPs (the smaller of the two budgets) **{better.name}** had "
                           f"validation loss {lbest:.4f} and **{worse.name}** {lworse:.4f}.")
    if len(arms) >= 2:
        best = min(arms, key=lambda a: a.final_loss)
        cheapest = min(arms, key=lambda a: a.total_flops)
        out.append(f"Lowest final validation loss: **{best.name}** ({best.final_loss:.4f}, {best.total_flops:.3g} "
                   f"FLOPs). Fewest training FLOPs: **{cheapest.name}** ({cheapest.total_flops:.3g}).")
    return out


# --------------------------------------------------------------------------- output
def plot(arms: List[Arm], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for arm in arms:
        xs = [p[0] for p in arm.points]
        ys = [p[1] for p in arm.points]
        line, = ax.plot(xs, ys, marker="o", markersize=3, label=arm.name)
        cumulative = 0.0
        for stage in arm.stages[:-1]:  # mark the growth points
            cumulative += (stage.end - stage.start) * stage.flops_per_iteration
            ax.axvline(cumulative, color=line.get_color(), linestyle=":", linewidth=1)
    ax.set_xlabel("cumulative training FLOPs (model FLOPs, 3 x forward)")
    ax.set_ylabel("validation loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def render(arms: List[Arm], pairs: List[Tuple[Arm, Arm]], plot_path: str, output: str, command: str, settings: str,
           seconds: Optional[float]) -> str:
    rel_plot = os.path.relpath(os.path.abspath(plot_path), os.path.dirname(os.path.abspath(output)))
    lines = ["# Progressive scaling on CPU: Tokenformer token growth, training from scratch, Net2Net", ""]
    lines += ["Produced by", "", "```bash", command, "```", ""]
    if settings:
        lines += [f"with `{settings}`", ""]
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    total = f", {seconds / 60:.1f} minutes in all" if seconds is not None else ""
    lines += [f"on {when}, {cores} CPU cores{total}. The numbers below are generated by "
              "`examples/progressive_scaling/report.py` from the training logs; rerunning the command regenerates "
              "this page.", ""]
    lines += [f"![validation loss against cumulative training FLOPs]({rel_plot})", ""]
    lines += ["| arm | parameters (final) | iterations | training FLOPs | final validation loss | perplexity | "
              "training wall time |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for arm in arms:
        last = arm.stages[-1]
        lines.append(f"| {arm.name} | {last.parameters:,} | {last.end} | {arm.total_flops:.3g} | "
                     f"{arm.final_loss:.4f} | {math.exp(min(arm.final_loss, 20)):.2f} | "
                     f"{sum(s.seconds for s in arm.stages):.0f} s |")
    lines += ["", "Stages:", "", "| arm | stage | model | parameters | iterations | FLOPs per iteration | "
              "validation loss at the end | log |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for arm in arms:
        for i, stage in enumerate(arm.stages):
            a = stage.args
            if a.get("model_type", "tokenformer") == "transformer":
                model = (f"Transformer L={a['num_layers']} d={a['hidden_size']} heads={a['num_attention_heads']} "
                         f"MLP={a['ffn_hidden_size']}")
            else:
                model = (f"Tokenformer L={a['num_layers']} d={a['hidden_size']} tokens "
                         f"{a['qkv_num_param_tokens']}/{a['proj_num_param_tokens']}/{a['ffn_num_param_tokens']}")
            model += f", TP {a.get('tensor_model_parallel_size', '1')}"
            end_loss = stage.evals[-1][1]
            lines.append(f"| {arm.name} | {i + 1} | {model} | {stage.parameters:,} ({_fmt_params(stage.parameters)}) "
                         f"| {stage.start} to {stage.end} | {stage.flops_per_iteration:.3g} | {end_loss:.4f} | "
                         f"`{os.path.basename(stage.path)}` |")
    lines += ["", "## What the numbers show", ""]
    lines += [f"- {f}" for f in findings(arms, pairs)]
    lines += ["", "## How the comparison is set up", "",
              "- Every run uses the same data order (seed, sampler), the same learning-rate schedule (one cosine "
              "over all iterations, warmup included), the same validation batches at the same iterations and the "
              "same global batch. A grown run resumes the smaller run's iteration count and data position; the only "
              "difference between arms at the growth point is the model. (The paper restarts a cosine schedule "
              "for every stage; a shared schedule keeps this comparison free of schedule effects.)",
              "- Training FLOPs are model FLOPs: 3 x the forward FLOPs of `megatron_tokenformer/training/flops.py` "
              "(matrix products, token-token attention not halved for causality, the logits) per trained token.",
              "- Tokenformer growth (`tools/expand_checkpoint.py --param-token-growth-factor`) adds zero key tokens "
              "and small random value tokens, so the grown model starts from the small model's function; it keeps "
              "the small model's tau (sqrt of the old token counts), while the model trained from scratch uses "
              "sqrt of its own counts. Adam moments of the old tokens are carried over, new tokens start at zero.",
              "- Net2Net (`tools/expand_checkpoint.py --hidden-size`) duplicates every residual channel the same "
              "number of times (exact through LayerNorm), doubles the heads, copies MLP units and splits the "
              "inputs. Exact copies would stay copies under Adam, so a little noise is added to the new copies "
              "(`--net2net-noise-std`); the optimizer state starts afresh.",
              "- These are minutes of CPU training on a small corpus: the differences are what this budget shows, "
              "not a measurement at the paper's scale (examples/progressive_scaling/README.md has that recipe).",
              ""]
    return "\n".join(lines)


def parse_arm(text: str) -> Tuple[str, List[str]]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--arm {text!r}: expected NAME=LOG[,LOG...]")
    name, logs = text.split("=", 1)
    paths = [p for p in logs.split(",") if p]
    if not name.strip() or not paths:
        raise argparse.ArgumentTypeError(f"--arm {text!r}: expected NAME=LOG[,LOG...]")
    return name.strip(), paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arm", type=parse_arm, action="append", required=True,
                   help="NAME=LOG[,LOG...]: one line of the plot, the logs of its stages in order")
    p.add_argument("--compare", action="append", default=None, metavar="ARM=REFERENCE",
                   help="compare ARM with REFERENCE at equal FLOPs (default: every arm without 'scratch' in its "
                        "name with the 'scratch' arm whose name starts with the same word)")
    p.add_argument("--output", required=True, help="Markdown report to write")
    p.add_argument("--plot", required=True, help="PNG to write")
    p.add_argument("--command", default="examples/progressive_scaling/cpu_repro.sh",
                   help="the command that produced the logs (quoted in the report)")
    p.add_argument("--settings", default="", help="its settings (quoted in the report)")
    p.add_argument("--seconds", type=float, default=None, help="its total wall time")
    args = p.parse_args(argv)
    try:
        arms = [build_arm(name, paths) for name, paths in args.arm]
        names = [a.name for a in arms]
        if len(set(names)) != len(names):
            raise ReportError(f"--arm names must differ, got {names}")
        by_name = {a.name: a for a in arms}
        if args.compare:
            pairs = []
            for item in args.compare:
                arm, _, ref = item.partition("=")
                if arm not in by_name or ref not in by_name:
                    raise ReportError(f"--compare {item!r}: both sides must be arm names, one of {names}")
                pairs.append((by_name[arm], by_name[ref]))
        else:
            pairs = default_pairs(arms)
        plot(arms, args.plot, "validation loss vs. training compute")
        text = render(arms, pairs, args.plot, args.output, args.command, args.settings, args.seconds)
    except ReportError as exc:
        sys.stderr.write(f"report.py: error: {exc}\n")
        return 2
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    tmp = args.output + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, args.output)
    print(f"wrote {args.output} and {args.plot}")
    for line in findings(arms, pairs):
        print(" - " + line.replace("**", ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
