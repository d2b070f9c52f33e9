"""benchmarks/gpu_throughput.py: without CUDA it says so in one line and exits 0; its log parsing."""

import os
import subprocess
import sys

import pytest
import torch

from tests.helpers.paths import REPO_ROOT

BENCH = os.path.join(REPO_ROOT, "benchmarks", "gpu_throughput.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the benchmark really runs")
def test_cpu_only_machine_one_line_exit_0():
    proc = subprocess.run([sys.executable, BENCH], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["gpu_throughput.py: no CUDA device on this machine; nothing to measure"]


def test_parses_the_last_log_interval():
    import importlib.util
    spec = importlib.util.spec_from_file_location("gpu_throughput", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    log = (" iteration       10/      30 | tokens/s: 100.0 | TFLOP/s per GPU: 1.000 | MFU: 0.10% |\n"
           " iteration       30/      30 | consumed samples:          120 | tokens/s: 81234.5 |"
           " TFLOP/s per GPU: 312.500 | MFU: 31.59% |\n"
           "> peak GPU memory: 41.25 GiB allocated, 44.00 GiB reserved (rank 0)\n")
    row = bench.parse_last_interval(log)
    assert row["tokens/s"] == 81234.5 and row["TFLOP/s per GPU"] == 312.5 and row["MFU"] == 31.59
    assert row["peak memory (GiB)"] == 41.25
