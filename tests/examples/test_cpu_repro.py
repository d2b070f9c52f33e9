"""examples/progressive_scaling/cpu_repro.sh end to end at a tiny scale (env overrides), and report.py.

The run trains all four arms for a few iterations on a generated text (--text), grows the Tokenformer
x4 with a TP 1 -> 2 reshard and continues it on 2 ranks, Net2Net-widens the Transformer, and writes the
report and plot. Checked against independent numbers: the FLOPs column against the closed-form FLOPs
written here, the validation losses against the logs' own lines, the stage boundaries against the
iteration counts.
"""

import os
import random
import re
import subprocess
import sys

import pytest

from tests.helpers import zygote

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "examples", "progressive_scaling", "cpu_repro.sh")
REPORT_PY = os.path.join(ROOT, "examples", "progressive_scaling", "report.py")
TINY = dict(S="4", G="4", EVAL_INTERVAL="2", EVAL_ITERS="1", VOCAB="512", WARMUP="1", SEQ="32", GLOBAL_BATCH="4",
            D="32", HEADS="2", N_SMALL="8", GROWTH="4", TRANSFORMER_FFN="48", WIDE_D="64", WIDE_FFN="96",
            NET2NET_NOISE="0.05")


def write_text(path):
    """A small made-up language: 300 words from syllables in a fixed sentence pattern (learnable)."""
    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "ve", "da", "xi", "gu", "be", "fo", "ha", "ju"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(300)]
    nouns, verbs, adjectives = words[:120], words[120:220], words[220:]
    with open(path, "w") as f:
        for _ in range(600):
            for _ in range(rng.randint(2, 6)):
                a, b = rng.choice(nouns), rng.choice(nouns)
                f.write(f"the {rng.choice(adjectives)} {a} {rng.choice(verbs)} the {b}, and the {b} "
                        f"{rng.choice(verbs)} {rng.randint(1, 99)} {a}s.\n")
            f.write("\n")


def forward_flops(model, L, d, T, V, n=None, f=None):
    if model == "tokenformer":
        return L * (4 * d * (3 * n + n + 4 * n) + 4 * T * d) + 2 * d * V
    return L * (8 * d * d + 4 * d * f + 4 * T * d) + 2 * d * V


@pytest.fixture(scope="module")
def repro(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cpu_repro")
    text = tmp / "text.txt"
    write_text(text)
    # the script's Python runs forked by this worker's fork server (tests/helpers/zygote.py: shim_env)
    env = zygote.shim_env(dict(os.environ, **TINY, WORK=str(tmp / "work"), REPORT=str(tmp / "docs" / "report.md"),
                               PLOT=str(tmp / "docs" / "plot.png")))
    proc = subprocess.run(["bash", SCRIPT, "--text", str(text)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp, proc


def test_all_arms_run_and_the_report_is_written(repro):
    tmp, proc = repro
    report = (tmp / "docs" / "report.md").read_text()
    png = (tmp / "docs" / "plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "![validation loss against cumulative training FLOPs](plot.png)" in report
    assert "cpu_repro.sh --text" in report and "S=4 G=4" in report
    logs = tmp / "work" / "logs"
    # the growth arm: stage 2 resumed the grown, resharded checkpoint at iteration S on 2 ranks
    grown = (logs / "tokenformer_x4_grown_lr1e-3_s1234.log").read_text()
    assert "loaded checkpoint" in grown and "(iteration 4, consumed samples 16)" in grown
    assert re.search(r"tensor_model_parallel_size \.+ 2", grown)
    assert re.search(r"qkv_num_param_tokens \.+ 32", grown) and re.search(r"ffn_num_param_tokens \.+ 128", grown)
    wide = (logs / "transformer_wide_lr1e-3_s1234.log").read_text()
    assert re.search(r"hidden_size \.+ 64", wide) and re.search(r"num_attention_heads \.+ 4", wide)
    expand = (logs / "transformer_expand_lr1e-3_s1234.log").read_text()
    assert "wrote" in expand

    # results table: arm | LR | seeds | parameters | iterations | FLOPs | final loss | perplexity | wall time
    rows = {m.group(1): (m.group(1),) + m.groups()[2:] for m in re.finditer(
        r"^\| ([^|]+?) \| 1e-3 \| (1) \| ([\d,]+) \| (\d+) \| ([\d.e+]+) \| ([\d.]+) \| ([\d.]+) \|", report,
        flags=re.M)}
    small = {name: rows.pop(name) for name in ("Tokenformer small", "Transformer small")}
    assert all(r[2] == "4" for r in small.values())  # the stage-1 runs (sweep table only) stop at S
    assert set(rows) == {"Tokenformer grown x4 (TP 1->2)", "Tokenformer x4 from scratch",
                         "Transformer Net2Net-widened", "Transformer wide from scratch"}
    V, T, tokens = 512, 32, 4 * 32
    expected = {  # total training FLOPs = sum over stages of iterations x 3 x forward FLOPs x tokens
        "Tokenformer grown x4 (TP 1->2)": 4 * 3 * tokens * (forward_flops("tokenformer", 4, 32, T, V, n=8)
                                                            + forward_flops("tokenformer", 4, 32, T, V, n=32)),
        "Tokenformer x4 from scratch": 8 * 3 * tokens * forward_flops("tokenformer", 4, 32, T, V, n=32),
        "Transformer Net2Net-widened": 4 * 3 * tokens * (forward_flops("transformer", 4, 32, T, V, f=48)
                                                         + forward_flops("transformer", 4, 64, T, V, f=96)),
        "Transformer wide from scratch": 8 * 3 * tokens * forward_flops("transformer", 4, 64, T, V, f=96),
    }
    for name, (_, params, iters, flops, loss, ppl) in rows.items():
        assert iters == "8"
        assert abs(float(flops) / expected[name] - 1) < 1e-2, (name, flops, expected[name])
        assert abs(float(ppl) / (2.718281828 ** float(loss)) - 1) < 1e-3
    # the final loss of each arm is the last validation line of its last log
    last = {"Tokenformer x4 from scratch": "tokenformer_x4_scratch_lr1e-3_s1234.log",
            "Tokenformer grown x4 (TP 1->2)": "tokenformer_x4_grown_lr1e-3_s1234.log",
            "Transformer Net2Net-widened": "transformer_wide_lr1e-3_s1234.log",
            "Transformer wide from scratch": "transformer_scratch_lr1e-3_s1234.log"}
    for name, log in last.items():
        values = re.findall(r"loss at iteration \d+ \| lm loss value: ([\d.E+-]+)", (logs / log).read_text())
        assert abs(float(values[-1]) - float(rows[name][4])) < 1e-4
    # same parameter count for the grown Tokenformer and the one from scratch
    assert rows["Tokenformer grown x4 (TP 1->2)"][1] == rows["Tokenformer x4 from scratch"][1]
    assert "## What the numbers show" in report and "at equal training compute" in report


def test_report_refuses_an_incomplete_log(repro, tmp_path):
    tmp, _ = repro
    full = (tmp / "work" / "logs" / "tokenformer_small_lr1e-3_s1234.log").read_text()
    cut = tmp_path / "cut.log"
    cut.write_text(full[: full.index("> training from iteration")])
    proc = subprocess.run(["python", REPORT_PY, "--output", str(tmp_path / "r.md"), "--plot", str(tmp_path / "p.png"),
                           "--arm", f"a={cut}"], capture_output=True, text=True)
    assert proc.returncode == 2 and f"{cut}: not a complete pretrain_tokenformer.py log" in proc.stderr
    assert not (tmp_path / "r.md").exists()
    # stages that do not connect (the scratch run does not start where the small run stopped)
    logs = tmp / "work" / "logs"
    proc = subprocess.run(["python", REPORT_PY, "--output", str(tmp_path / "r.md"), "--plot", str(tmp_path / "p.png"),
                           "--arm", f"a={logs / 'tokenformer_small_lr1e-3_s1234.log'},"
                                    f"{logs / 'tokenformer_x4_scratch_lr1e-3_s1234.log'}"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "the stages do not connect" in proc.stderr


def test_bad_arguments_exit_2():
    for argv, message in ((["--text", "/nonexistent/file.txt"], "--text /nonexistent/file.txt: no such file"),
                          (["--frobnicate"], "unknown argument '--frobnicate'")):
        proc = subprocess.run(["bash", SCRIPT, *argv], capture_output=True, text=True)
        assert proc.returncode == 2 and message in proc.stderr
    # the sweep knobs are checked before anything is built or deleted
    for env, message in (({"GROWTHS": "3 4"}, "GROWTHS: '3 4' must be increasing integers > 1, each a multiple"),
                         ({"LRS": "1e-3 fast"}, "LRS: 'fast' is not a positive number"),
                         ({"SEEDS": "1 x"}, "SEEDS: 'x' is not a non-negative integer"),
                         ({"ARMS": "tokenformer-grown bogus"}, "ARMS: unknown arm 'bogus'"),
                         ({"GROWN_TP": "3"}, "GROWN_TP must be 1 or 2")):
        proc = subprocess.run(["bash", SCRIPT], capture_output=True, text=True,
                              env=dict(os.environ, WORK="/nonexistent/never_made", PYTHON=sys.executable, **env))
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert not os.path.exists("/nonexistent/never_made")
