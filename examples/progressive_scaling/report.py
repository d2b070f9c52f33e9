#!/usr/bin/env python
"""Turn the training logs of a progressive-scaling experiment into a Markdown report and a plot.

    python examples/progressive_scaling/report.py --output docs/progressive_scaling.md \\
        --plot docs/progressive_scaling.png --manifest runs/progressive_scaling/manifest.tsv \\
        --compare "Tokenformer grown x4=Tokenformer x4 from scratch"
    python examples/progressive_scaling/report.py --manifest M --best-lr "Tokenformer small"   # prints the LR

A RUN is one training curve: an arm name, a learning rate, a seed and the logs of its stages in order
(a stage resumes where the previous one stopped). The manifest lists runs, one per line, tab-separated:
``ARM<TAB>LR<TAB>SEED<TAB>LOG[,LOG...]``; ``--arm NAME=LOG[,LOG...]`` adds a single run (LR and seed
read from its first log). From each log (pretrain_tokenformer.py's output) it reads the arguments block,
the parameter summary, the validation lines and the final ``> done`` line. Training FLOPs are the model
FLOPs of megatron_tokenformer/training/flops.py (3 x forward, no recomputation) times the tokens of every
iteration, summed over the stages; the padded vocabulary is the embedding count of the parameter summary
divided by the hidden size.

Statistics (the functions below are what the tests check against independent arithmetic):

- learning-rate selection (:func:`select_lr`): per arm, the LR with the lowest mean final validation
  loss over the seeds that EVERY LR of that arm was run with (the sweep seeds), so an LR run with more
  seeds is not favoured or penalised;
- mean and spread over seeds (:func:`mean_spread`): the mean and the sample standard deviation (n - 1);
- the mean curve (:func:`mean_curve`): the seeds' validation losses averaged at the iterations all of
  them evaluated (their FLOPs are the same: the same model and schedule);
- FLOPs to a target loss (:func:`flops_to_reach`): the first crossing of the target by the piecewise
  linear curve of validation loss against cumulative FLOPs; loss at equal FLOPs (:func:`loss_at`):
  the same curve interpolated.

Writes the report (sweep table, results at each arm's chosen LR with mean +- spread, FLOPs to the
target loss and loss at equal FLOPs per compared pair, the stages) and a PNG of validation loss against
cumulative training FLOPs with error bars (mean +- standard deviation over seeds; matplotlib, Agg).
A page that already exists keeps everything below the line ``<!-- written by hand below -->``.
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
    """One run: the stages of one curve (``lr``, ``seed``: as the manifest names them)."""
    name: str
    stages: List[Stage]
    points: List[Tuple[float, float, int]] = field(default_factory=list)  # (cumulative FLOPs, val loss, iteration)
    lr: str = ""
    seed: str = ""

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


# --------------------------------------------------------------------------- statistics
Points = List[Tuple[float, float, int]]  # (cumulative FLOPs, validation loss, iteration)
HAND_WRITTEN_MARKER = "<!-- written by hand below -->"


def loss_at(arm, flops: float) -> Optional[float]:
    """Validation loss at ``flops`` (linear interpolation between evaluations); None outside the curve.
    ``arm``: an :class:`Arm` or a list of points."""
    pts = arm.points if isinstance(arm, Arm) else arm
    for (f0, l0, _), (f1, l1, _) in zip(pts, pts[1:]):
        if f0 <= flops <= f1:
            return l0 if f1 == f0 else l0 + (l1 - l0) * (flops - f0) / (f1 - f0)
    if pts and math.isclose(flops, pts[-1][0], rel_tol=1e-9):
        return pts[-1][1]
    return None


def flops_to_reach(arm, loss: float) -> Optional[float]:
    """First cumulative FLOPs at which the (interpolated) validation loss is <= ``loss``; None if never.
    ``arm``: an :class:`Arm` or a list of points."""
    pts = arm.points if isinstance(arm, Arm) else arm
    if pts and pts[0][1] <= loss:
        return pts[0][0]
    for (f0, l0, _), (f1, l1, _) in zip(pts, pts[1:]):
        if l1 <= loss < l0:
            return f0 + (f1 - f0) * (l0 - loss) / (l0 - l1)
    return None


def mean_spread(values: List[float]) -> Tuple[float, float]:
    """(mean, sample standard deviation with n - 1; 0 for one value)."""
    if not values:
        raise ReportError("no values to average")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def mean_curve(runs: List["Arm"]) -> List[Tuple[float, float, float, int]]:
    """(FLOPs, mean loss, std loss, iteration) at the iterations every run evaluated."""
    common = set(p[2] for p in runs[0].points)
    for run in runs[1:]:
        common &= set(p[2] for p in run.points)
    out = []
    for it in sorted(common):
        losses = [next(p[1] for p in run.points if p[2] == it) for run in runs]
        flops = next(p[0] for p in runs[0].points if p[2] == it)
        mean, std = mean_spread(losses)
        out.append((flops, mean, std, it))
    return out


def select_lr(runs_by_lr: Dict[str, List["Arm"]]) -> str:
    """The LR with the lowest mean final loss over the seeds every LR was run with (the sweep seeds)."""
    if not runs_by_lr:
        raise ReportError("select_lr: no runs")
    seed_sets = [set(r.seed for r in runs) for runs in runs_by_lr.values()]
    shared = set.intersection(*seed_sets)
    if not shared:
        raise ReportError(f"the learning rates {sorted(runs_by_lr)} share no seed; cannot compare them")
    scores = {lr: mean_spread([r.final_loss for r in runs if r.seed in shared])[0] for lr, runs in runs_by_lr.items()}
    return min(scores, key=lambda lr: (scores[lr], float(lr)))


# --------------------------------------------------------------------------- runs and arms
@dataclass
class ArmGroup:
    """All runs of one arm: ``runs[lr]`` = the runs (one per seed) at that learning rate."""
    name: str
    runs: Dict[str, List[Arm]]
    sweep_only: bool = False
    best_lr: str = ""

    @property
    def best(self) -> List[Arm]:
        return self.runs[self.best_lr]

    @property
    def curve(self):
        return mean_curve(self.best)

    @property
    def final(self) -> Tuple[float, float]:
        return mean_spread([r.final_loss for r in self.best])

    @property
    def total_flops(self) -> float:
        return self.best[0].total_flops


def read_manifest(path: str) -> List[Tuple[str, str, str, List[str]]]:
    if not os.path.isfile(path):
        raise ReportError(f"--manifest {path}: no such file")
    out = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.split("\t")
            if len(parts) != 4 or not all(p.strip() for p in parts):
                raise ReportError(f"--manifest {path}:{number}: expected ARM<TAB>LR<TAB>SEED<TAB>LOG[,LOG...]")
            arm, lr, seed, logs = (p.strip() for p in parts)
            try:
                float(lr)
            except ValueError:
                raise ReportError(f"--manifest {path}:{number}: learning rate {lr!r} is not a number") from None
            out.append((arm, lr, seed, [x for x in logs.split(",") if x]))
    if not out:
        raise ReportError(f"--manifest {path}: no runs")
    return out


def build_groups(entries: List[Tuple[str, str, str, List[str]]], sweep_only=()) -> List[ArmGroup]:
    groups: Dict[str, ArmGroup] = {}
    cache: Dict[Tuple[str, ...], Arm] = {}
    for name, lr, seed, logs in entries:
        key = (name,) + tuple(logs)
        run = cache.get(key) or build_arm(name, logs)
        cache[key] = run
        run.lr, run.seed = lr, seed
        group = groups.setdefault(name, ArmGroup(name, {}))
        if any(r.seed == seed for r in group.runs.get(lr, [])):
            raise ReportError(f"arm {name!r}: two runs with learning rate {lr} and seed {seed}")
        group.runs.setdefault(lr, []).append(run)
    for group in groups.values():
        group.best_lr = select_lr(group.runs)
        group.sweep_only = group.name in sweep_only
    unknown = set(sweep_only) - set(groups)
    if unknown:
        raise ReportError(f"--sweep-only {sorted(unknown)}: no such arm (arms: {sorted(groups)})")
    return list(groups.values())


# --------------------------------------------------------------------------- comparisons
def _pm(mean: float, std: float, n: int, fmt: str = ".4f") -> str:
    return f"{mean:{fmt}}" if n < 2 else f"{mean:{fmt}} ± {std:{fmt}}"


def compare(arm: ArmGroup, reference: ArmGroup) -> Dict[str, object]:
    """The figures of merit of ``arm`` against ``reference`` (target = reference's mean final loss):
    FLOPs to the target (mean curve; per seed), their ratio, and both losses at ``arm``'s budget."""
    target = reference.final[0]
    out: Dict[str, object] = {"target": target}
    for who, group in (("arm", arm), ("ref", reference)):
        curve = [(f, m, it) for f, m, _, it in group.curve]
        out[f"{who}_flops_mean_curve"] = flops_to_reach(curve, target)
        per_seed = [flops_to_reach(r, target) for r in group.best]
        reached = [x for x in per_seed if x is not None]
        out[f"{who}_seeds_reached"] = (len(reached), len(per_seed))
        out[f"{who}_flops_per_seed"] = mean_spread(reached) if reached else None
    a, r = out["arm_flops_mean_curve"], out["ref_flops_mean_curve"]
    out["ratio"] = a / r if a is not None and r else None
    budget = arm.total_flops
    out["budget"] = budget
    for who, group in (("arm", arm), ("ref", reference)):
        losses = [loss_at(run, budget) for run in group.best]
        out[f"{who}_loss_at_budget"] = mean_spread(losses) if all(x is not None for x in losses) else None
    return out


def findings(groups: List[ArmGroup], pairs: List[Tuple[ArmGroup, ArmGroup]]) -> List[str]:
    out = []
    for arm, ref in pairs:
        c = compare(arm, ref)
        n_arm, n_ref = len(arm.best), len(ref.best)
        line = (f"**{arm.name}** (LR {arm.best_lr}, {n_arm} seed{'s' if n_arm > 1 else ''}) ended at validation loss "
                f"{_pm(*arm.final, n_arm)} after {arm.total_flops:.3g} training FLOPs; ")
        if c["ref_loss_at_budget"] is not None:
            (la, _), (lr_, sr) = c["arm_loss_at_budget"], c["ref_loss_at_budget"]
            verdict = "lower (better)" if la < lr_ else "higher (worse)"
            line += (f"**{ref.name}** had {_pm(lr_, sr, n_ref)} at the same FLOPs, so the mean loss is "
                     f"{abs(la - lr_):.4f} {verdict} at equal training compute. ")
        else:
            line += f"this is outside the range of **{ref.name}**'s evaluations. "
        if c["arm_flops_mean_curve"] is None:
            line += (f"It never reached the target loss {c['target']:.4f} (the mean final loss of {ref.name}).")
        else:
            line += (f"It reached the target loss {c['target']:.4f} (the mean final loss of {ref.name}) at "
                     f"{c['arm_flops_mean_curve']:.3g} FLOPs, {c['ratio']:.2f}x the {c['ref_flops_mean_curve']:.3g} "
                     f"FLOPs {ref.name} needed.")
        out.append(line)
    shown = [g for g in groups if not g.sweep_only]
    if len(shown) >= 2:
        best = min(shown, key=lambda g: g.final[0])
        cheapest = min(shown, key=lambda g: g.total_flops)
        out.append(f"Lowest mean final validation loss: **{best.name}** ({best.final[0]:.4f}, {best.total_flops:.3g} "
                   f"FLOPs). Fewest training FLOPs: **{cheapest.name}** ({cheapest.total_flops:.3g}).")
    return out


def default_pairs(groups: List[ArmGroup]) -> List[Tuple[ArmGroup, ArmGroup]]:
    """Each multi-stage arm against the 'scratch' arm of the same family (first word of the name) with the
    most final parameters."""
    scratch = [g for g in groups if "scratch" in g.name.lower() and not g.sweep_only]
    pairs = []
    for g in groups:
        if g.sweep_only or g in scratch or len(g.best[0].stages) < 2:
            continue
        family = g.name.split()[0].lower()
        same = [r for r in scratch if r.name.split()[0].lower() == family] or scratch
        if same:
            pairs.append((g, max(same, key=lambda r: r.best[0].stages[-1].parameters)))
    return pairs


# --------------------------------------------------------------------------- output
def plot(groups: List[ArmGroup], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for group in groups:
        if group.sweep_only:
            continue
        curve = group.curve
        label = f"{group.name} (LR {group.best_lr}, {len(group.best)} seed{'s' if len(group.best) > 1 else ''})"
        bars = ax.errorbar([c[0] for c in curve], [c[1] for c in curve], yerr=[c[2] for c in curve], marker="o",
                           markersize=3, capsize=2, label=label)
        color = bars[0].get_color()
        cumulative = 0.0
        for stage in group.best[0].stages[:-1]:  # mark the growth points
            cumulative += (stage.end - stage.start) * stage.flops_per_iteration
            ax.axvline(cumulative, color=color, linestyle=":", linewidth=1)
    ax.set_xlabel("cumulative training FLOPs (model FLOPs, 3 x forward)")
    ax.set_ylabel("validation loss (mean ± std over seeds)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def _model(stage: Stage) -> str:
    a = stage.args
    if a.get("model_type", "tokenformer") == "transformer":
        model = (f"Transformer L={a['num_layers']} d={a['hidden_size']} heads={a['num_attention_heads']} "
                 f"MLP={a['ffn_hidden_size']}")
    else:
        model = (f"Tokenformer L={a['num_layers']} d={a['hidden_size']} tokens "
                 f"{a['qkv_num_param_tokens']}/{a['proj_num_param_tokens']}/{a['ffn_num_param_tokens']}")
    return model + f", TP {a.get('tensor_model_parallel_size', '1')}"


def _opt(value, fmt: str) -> str:
    return "not reached" if value is None else format(value, fmt)


def render(groups: List[ArmGroup], pairs: List[Tuple[ArmGroup, ArmGroup]], plot_path: str, output: str,
           command: str, settings: str, seconds: Optional[float]) -> str:
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
              "this page (except the hand-written part at the end).", ""]
    lines += [f"![validation loss against cumulative training FLOPs]({rel_plot})", ""]
    # sweep
    swept = [g for g in groups if len(g.runs) > 1]
    if swept:
        lrs = sorted({lr for g in swept for lr in g.runs}, key=float)
        lines += ["## Learning-rate sweep", "",
                  "Final validation loss per learning rate (mean over the seeds every learning rate of the arm was "
                  "run with); **bold**: the learning rate each arm uses below.", "",
                  "| arm | " + " | ".join(f"LR {lr}" for lr in lrs) + " | chosen |",
                  "| --- | " + " | ".join("---" for _ in lrs) + " | --- |"]
        for g in swept:
            shared = set.intersection(*[set(r.seed for r in runs) for runs in g.runs.values()])
            cells = []
            for lr in lrs:
                if lr not in g.runs:
                    cells.append("")
                    continue
                value = mean_spread([r.final_loss for r in g.runs[lr] if r.seed in shared])[0]
                cells.append(f"**{value:.4f}**" if lr == g.best_lr else f"{value:.4f}")
            lines.append(f"| {g.name} | " + " | ".join(cells) + f" | {g.best_lr} |")
        lines.append("")
    # results
    lines += ["## Results at each arm's chosen learning rate", "",
              "Mean ± sample standard deviation over the seeds (n - 1).", "",
              "| arm | LR | seeds | parameters (final) | iterations | training FLOPs | final validation loss | "
              "perplexity (of the mean loss) | training wall time (mean) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for g in groups:
        last = g.best[0].stages[-1]
        mean, std = g.final
        wall = mean_spread([sum(s.seconds for s in r.stages) for r in g.best])[0]
        lines.append(f"| {g.name} | {g.best_lr} | {len(g.best)} | {last.parameters:,} | {last.end} | "
                     f"{g.total_flops:.3g} | {_pm(mean, std, len(g.best))} | {math.exp(min(mean, 20)):.2f} | "
                     f"{wall:.0f} s |")
    lines.append("")
    if pairs:
        lines += ["## Training FLOPs to the target loss, and loss at equal FLOPs", "",
                  "Target: the reference arm's mean final validation loss. FLOPs to target: where the mean curve "
                  "first reaches it (linear interpolation between evaluations); per seed: mean ± std over the "
                  "seeds whose own curve reaches it. Loss at equal FLOPs: both arms at the grown arm's total "
                  "training FLOPs.", "",
                  "| arm | reference | target loss | FLOPs to target (mean curve) | per seed (reached) | "
                  "reference FLOPs to target | ratio arm / reference | arm loss at its budget | reference loss at "
                  "that budget |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for arm, ref in pairs:
            c = compare(arm, ref)
            per_seed = c["arm_flops_per_seed"]
            k, n = c["arm_seeds_reached"]
            seeds = "none" if per_seed is None else f"{_pm(per_seed[0], per_seed[1], k, '.3g')} ({k}/{n})"
            la, lr_ = c["arm_loss_at_budget"], c["ref_loss_at_budget"]
            lines.append(f"| {arm.name} | {ref.name} | {c['target']:.4f} | {_opt(c['arm_flops_mean_curve'], '.3g')} "
                         f"| {seeds} | {_opt(c['ref_flops_mean_curve'], '.3g')} | {_opt(c['ratio'], '.2f')} | "
                         f"{'n/a' if la is None else _pm(la[0], la[1], len(arm.best))} (at {c['budget']:.3g}) | "
                         f"{'outside its curve' if lr_ is None else _pm(lr_[0], lr_[1], len(ref.best))} |")
        lines.append("")
    lines += ["Stages (of each arm's first run at its chosen learning rate):", "",
              "| arm | stage | model | parameters | iterations | FLOPs per iteration | validation loss at the end "
              "(mean over seeds) | log |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for g in groups:
        for i, stage in enumerate(g.best[0].stages):
            ends = [r.stages[i].evals[-1][1] for r in g.best]
            lines.append(f"| {g.name} | {i + 1} | {_model(stage)} | {stage.parameters:,} "
                         f"({_fmt_params(stage.parameters)}) | {stage.start} to {stage.end} | "
                         f"{stage.flops_per_iteration:.3g} | {mean_spread(ends)[0]:.4f} | "
                         f"`{os.path.basename(stage.path)}` |")
    lines += ["", "## What the numbers show", ""]
    lines += [f"- {f}" for f in findings(groups, pairs)]
    lines += ["", "## How the comparison is set up", "",
              "- Every run of a seed uses the same data order (the seed also sets the initialisation), the same "
              "learning-rate schedule shape (one cosine over all iterations, warmup included; only the peak and "
              "minimum change with the LR, the minimum staying a tenth of the peak), the same validation batches at "
              "the same iterations and the same global batch. A grown run resumes the smaller run's iteration "
              "count, data position and schedule; the only difference between arms at the growth point is the "
              "model. (The paper restarts a cosine schedule for every stage; a shared schedule keeps this "
              "comparison free of schedule effects.)",
              "- Learning rates: every arm trained from scratch is swept; a growth stage continues with the "
              "learning rate chosen for the small model it grew from (its schedule continues, as the optimizer "
              "state does).",
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


def _entries(args) -> List[Tuple[str, str, str, List[str]]]:
    entries = [entry for path in args.manifest for entry in read_manifest(path)]
    for name, paths in args.arm or []:
        first = parse_log(paths[0])
        entries.append((name, first.arg("lr"), first.arg("seed"), paths))
    if not entries:
        raise ReportError("give --manifest or at least one --arm")
    return entries


def _keep_hand_written(path: str) -> str:
    if not os.path.isfile(path):
        return ""
    with open(path) as f:
        text = f.read()
    i = text.find(HAND_WRITTEN_MARKER)
    return "" if i < 0 else text[i:]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", action="append", default=[],
                   help="runs, one per line: ARM<TAB>LR<TAB>SEED<TAB>LOG[,LOG...] (may be repeated)")
    p.add_argument("--arm", type=parse_arm, action="append", default=None,
                   help="NAME=LOG[,LOG...]: one more run, the logs of its stages in order (LR and seed from the log)")
    p.add_argument("--best-lr", default=None, metavar="ARM",
                   help="print ARM's selected learning rate and exit (no report)")
    p.add_argument("--sweep-only", action="append", default=[], metavar="ARM",
                   help="show ARM in the sweep table only (not in the plot or the comparisons)")
    p.add_argument("--compare", action="append", default=None, metavar="ARM=REFERENCE",
                   help="compare ARM with REFERENCE (target loss: REFERENCE's mean final loss; default: every "
                        "multi-stage arm with the largest 'scratch' arm whose name starts with the same word)")
    p.add_argument("--output", default=None, help="Markdown report to write")
    p.add_argument("--plot", default=None, help="PNG to write")
    p.add_argument("--command", default="examples/progressive_scaling/cpu_repro.sh",
                   help="the command that produced the logs (quoted in the report)")
    p.add_argument("--settings", default="", help="its settings (quoted in the report)")
    p.add_argument("--seconds", type=float, default=None, help="its total wall time")
    args = p.parse_args(argv)
    if args.best_lr is None and (args.output is None or args.plot is None):
        p.error("--output and --plot are required (unless --best-lr)")
    try:
        groups = build_groups(_entries(args), args.sweep_only)
        by_name = {g.name: g for g in groups}
        if args.best_lr is not None:
            if args.best_lr not in by_name:
                raise ReportError(f"--best-lr {args.best_lr!r}: no such arm (arms: {sorted(by_name)})")
            print(by_name[args.best_lr].best_lr)
            return 0
        if args.compare:
            pairs = []
            for item in args.compare:
                arm, _, ref = item.partition("=")
                if arm not in by_name or ref not in by_name:
                    raise ReportError(f"--compare {item!r}: both sides must be arm names, one of {sorted(by_name)}")
                pairs.append((by_name[arm], by_name[ref]))
        else:
            pairs = default_pairs(groups)
        text = render(groups, pairs, args.plot, args.output, args.command, args.settings, args.seconds)
        plot(groups, args.plot, "validation loss vs. training compute")
    except ReportError as exc:
        sys.stderr.write(f"report.py: error: {exc}\n")
        return 2
    hand = _keep_hand_written(args.output)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    tmp = args.output + ".tmp"
    with open(tmp, "w") as f:
        f.write(text + ("\n" + hand if hand else ""))
    os.replace(tmp, args.output)
    print(f"wrote {args.output} and {args.plot}")
    for line in findings(groups, pairs):
        print(" - " + line.replace("**", ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
