"""examples/progressive_scaling/parallel_sweep.sh: the streams it plans, its input checks, and one tiny
run end to end (all streams at once, one report over their manifests, then REUSE=1 retrains nothing).

Independent references: every stream must train S + G x (number of growth stages) iterations in total
(the arithmetic is done here), and the report's final losses are read back from the training logs.
"""

import os
import re
import subprocess

import pytest

from tests.examples.test_cpu_repro import write_text
from tests.helpers import zygote
from tests.helpers.paths import REPO_ROOT

SCRIPT = os.path.join(REPO_ROOT, "examples", "progressive_scaling", "parallel_sweep.sh")
TINY = dict(S="4", G="2", EVAL_INTERVAL="2", EVAL_ITERS="1", VOCAB="512", WARMUP="1", SEQ="32", GLOBAL_BATCH="4",
            D="32", HEADS="2", N_SMALL="8", TRANSFORMER_FFN="48", WIDE_D="64", WIDE_FFN="96",
            NET2NET_NOISE="0.05", LAYERS="2")


def sweep(args, tmp, forked=False, **env):
    """The script; its Python runs forked by this worker's fork server where ``forked`` (the training
    runs: tests/helpers/zygote.py, shim_env)."""
    full = dict(os.environ, ROOT=str(tmp / "root"), REPORT=str(tmp / "docs" / "report.md"),
                PLOT=str(tmp / "docs" / "plot.png"), PYTHON=os.environ.get("PYTHON", "python"), **env)
    if forked:
        full = zygote.shim_env(full)
    return subprocess.run(["bash", SCRIPT, *args], env=full, capture_output=True, text=True, timeout=600)


def plan(tmp, **env):
    proc = sweep(["--dry-run"], tmp, **env)
    assert proc.returncode == 0, proc.stderr
    streams = {}
    for line in proc.stdout.splitlines():
        name, rest = line.split(": ", 1)
        streams[name] = dict(re.findall(r"(\w+)=((?:[^ =]+(?: (?![A-Z_]+=)[^ =]+)*))", rest))
    assert not (tmp / "root").exists()  # a dry run builds nothing
    return streams


@pytest.mark.parametrize("growths, s, g", [("2 4", 600, 300), ("2", 10, 7), ("2 4 8", 5, 3)])
def test_every_stream_trains_the_same_total(tmp_path, growths, s, g):
    streams = plan(tmp_path, GROWTHS=growths, S=str(s), G=str(g), LRS="1e-3 1e-2", SMALL_LRS="3e-3 3e-2")
    factors = growths.split()
    total = s + g * len(factors)
    assert set(streams) == {"grown", "net2net", "tscratch"} | {f"x{f}" for f in factors}
    for name, st in streams.items():
        assert int(st["S"]) + int(st["G"]) * len(st["GROWTHS"].split()) == total, (name, st)
        assert st["WORK"] == str(tmp_path / "root" / name)
    assert streams["grown"]["GROWTHS"] == growths and streams["grown"]["ARMS"] == "tokenformer-grown"
    for f in factors:
        assert streams[f"x{f}"]["GROWTHS"] == f and streams[f"x{f}"]["ARMS"] == "tokenformer-scratch"
    # the small models (the growth arms' start) are swept over SMALL_LRS, the full-size ones over LRS
    assert streams["grown"]["LRS"] == streams["net2net"]["LRS"] == "3e-3 3e-2"
    assert {streams[n]["LRS"] for n in streams if n not in ("grown", "net2net")} == {"1e-3 1e-2"}
    # the Transformer arms reach the largest Tokenformer's size in one step
    assert streams["net2net"]["GROWTHS"] == streams["tscratch"]["GROWTHS"] == factors[-1]


@pytest.mark.parametrize("env, message", [
    ({"GROWTHS": "2 3"}, "stream grown: GROWTHS: '2 3' must be increasing integers > 1, each a multiple"),
    ({"SMALL_LRS": "1e-3 fast"}, "stream grown: LRS: 'fast' is not a positive number"),
    ({"LRS": "0", "SMALL_LRS": "1e-3"}, "stream x2: LRS: '0' is not a positive number"),
    ({"SEEDS": "1 x"}, "SEEDS: 'x' is not a non-negative integer"),
    ({"GROWN_TP": "3"}, "GROWN_TP must be 1 or 2"),
    ({"S": "0"}, "S and G must be integers >= 1"),
])
def test_bad_settings_exit_2_before_anything_starts(tmp_path, env, message):
    proc = sweep([], tmp_path, **env)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("parallel_sweep.sh: error: ")
    assert not (tmp_path / "root").exists() and not (tmp_path / "docs").exists()


def test_bad_arguments_exit_2(tmp_path):
    for argv, message in ((["--text", "/nonexistent.txt"], "--text /nonexistent.txt: no such file"),
                          (["--frobnicate"], "unknown argument '--frobnicate'")):
        proc = sweep(argv, tmp_path)
        assert proc.returncode == 2 and message in proc.stderr


def test_tiny_sweep_end_to_end_and_reuse(tmp_path):
    text = tmp_path / "text.txt"
    write_text(text)
    settings = dict(TINY, GROWTHS="2", LRS="1e-3", SMALL_LRS="1e-3 3e-3", SEEDS="1234", GROWN_TP="1")
    proc = sweep(["--text", str(text)], tmp_path, forked=True, **settings)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    root = tmp_path / "root"
    report = (tmp_path / "docs" / "report.md").read_text()
    assert (tmp_path / "docs" / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "parallel_sweep.sh --text" in report and 'SMALL_LRS="1e-3 3e-3"' in report
    # the small Tokenformer was swept over both SMALL_LRS, the x2 from scratch over LRS only
    sweep_row = re.search(r"^\| Tokenformer small \| (.*) \|$", report, flags=re.M).group(1).split(" | ")
    assert len([c for c in sweep_row if re.fullmatch(r"\**\d+\.\d+\**", c)]) == 2
    # the grown arm starts from the small model's best LR; its final loss is its last log's last evaluation
    best = sweep_row[-1]  # the "chosen" column
    assert best in ("1e-3", "3e-3")
    grown = "Tokenformer grown x2 (TP 1->1)"
    row = re.search(rf"^\| {re.escape(grown)} \| ([\de.-]+) \| 1 \| [\d,]+ \| 6 \| [\d.e+]+ \| ([\d.]+) \|",
                    report, flags=re.M)
    assert row and row.group(1) == best
    log = (root / "grown" / "logs" / f"tokenformer_x2_grown_lr{best}_s1234.log").read_text()
    values = re.findall(r"loss at iteration \d+ \| lm loss value: ([\d.E+-]+)", log)
    assert abs(float(values[-1]) - float(row.group(2))) < 1e-4
    for arm in ("Tokenformer x2 from scratch", "Transformer Net2Net-widened", "Transformer wide from scratch"):
        assert re.search(rf"^\| {arm} \| [\de.-]+ \| 1 \| [\d,]+ \| 6 \|", report, flags=re.M), arm
    # the comparisons across streams: grown vs x2 from scratch, Net2Net vs wide, grown vs Net2Net
    for pair in ((grown, "Tokenformer x2 from scratch"),
                 ("Transformer Net2Net-widened", "Transformer wide from scratch"),
                 (grown, "Transformer Net2Net-widened")):
        assert re.search(rf"^\| {re.escape(pair[0])} \| {re.escape(pair[1])} \|", report, flags=re.M), pair
    # every stream shared one tokenizer and dataset
    assert {re.search(r"reusing the tokenizer and dataset in (\S+)", (root / f"{s}.out").read_text()).group(1)
            for s in ("grown", "x2", "net2net", "tscratch")} == {str(root / "data")}

    # REUSE=1: nothing is retrained, the report is written again from the same logs
    (tmp_path / "docs" / "report.md").unlink()
    proc = sweep(["--text", str(text)], tmp_path, forked=True, REUSE="1", **settings)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for s in ("grown", "x2", "net2net", "tscratch"):
        out = (root / f"{s}.out").read_text()
        assert "training " not in out and "reusing" in out, (s, out)
    again = (tmp_path / "docs" / "report.md").read_text()
    table = lambda page: page[page.index("## Learning-rate sweep"):page.index("## How the comparison")]  # noqa: E731
    assert table(again) == table(report)
