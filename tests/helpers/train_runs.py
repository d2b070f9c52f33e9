"""Helpers for the training tests: start pretrain_tokenformer.py under a launcher, with a hard
timeout that kills the whole process group, and read back the Megatron-format log lines.

Imported as ``helpers.train_runs``."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

from megatron_tokenformer.launch import find_free_port as free_port  # noqa: F401  (the one free-port helper)
from tests.helpers.paths import REPO_ROOT as ROOT

SCRIPT = os.path.join(ROOT, "pretrain_tokenformer.py")
VENV_BIN = os.path.dirname(sys.executable)

# A tiny Tokenformer whose every dimension divides TP = 2 and PP = 2.
TINY_MODEL = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
              "--qkv-num-param-tokens", "16", "--proj-num-param-tokens", "16", "--ffn-num-param-tokens", "32"]


def env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    e = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_SIZE",
                "SLURM_PROCID", "SLURM_STEP_ID", "PMI_SIZE", "PMIX_RANK"):
        e.pop(key, None)  # a test must not inherit the launcher variables of whoever runs pytest
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    e["PATH"] = VENV_BIN + os.pathsep + e.get("PATH", "")
    e["PYTHONUNBUFFERED"] = "1"
    e.setdefault("OMP_NUM_THREADS", "1")
    # every training run of the suite checks that each collective goes through the one choke point
    # (tensor_parallel/mappings.py) with its tensor on the communication device
    e.setdefault("MEGATRON_TOKENFORMER_CHECK_COLLECTIVES", "1")
    if extra:
        e.update(extra)
    return e


def run(cmd: Sequence[str], timeout: float, extra_env: Optional[Dict[str, str]] = None,
        cwd: str = ROOT) -> subprocess.CompletedProcess:
    """Run ``cmd`` to completion (stdout and stderr merged); on timeout kill its whole process group."""
    return finish(start(cmd, extra_env, cwd), timeout)


def start(cmd: Sequence[str], extra_env: Optional[Dict[str, str]] = None, cwd: str = ROOT,
          merge_stderr: bool = True) -> subprocess.Popen:
    """Start ``cmd`` in its own process group (collect with :func:`finish` or :func:`communicate_or_kill`)."""
    return subprocess.Popen(list(cmd), cwd=cwd, env=env(extra_env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE, text=True,
                            start_new_session=True)


def communicate_or_kill(p: subprocess.Popen, timeout: float):
    """``(stdout, stderr)`` of ``p``; on timeout kill its whole process group (launcher and ranks) and fail."""
    try:
        return p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise AssertionError(f"timed out after {timeout} s: {' '.join(map(str, p.args))}\n"
                             f"{(out or '')[-4000:]}\n{(err or '')[-3000:]}")


def finish(p: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
    out, _ = communicate_or_kill(p, timeout)
    return subprocess.CompletedProcess(p.args, p.returncode, out, "")


def torchrun(nproc: int, args: Sequence[str]) -> List[str]:
    if nproc == 1:
        return [sys.executable, SCRIPT] + list(args)
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), SCRIPT] + list(args)


def warm_launch(nproc: int, args: Sequence[str], extra_env: Optional[Dict[str, str]] = None) -> List[str]:
    """Like ``python SCRIPT`` (one rank) or :func:`torchrun` on one host, with the imports paid once: the
    ranks are forked by this worker's fork server (tests/helpers/zygote.py); where no server can run
    (imports that start threads) the plain command. For the tests whose subject is neither the launcher
    nor the process itself."""
    from tests.helpers import zygote

    return zygote.launch_command(nproc, SCRIPT, args, env(extra_env), torchrun(nproc, args))


def layout_args(tp: int, pp: int) -> List[str]:
    return ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]


_FIELD = re.compile(r"\s*([^:|]+):\s*([^|]*?)\s*\|")


def parse_iterations(text: str) -> List[Dict[str, object]]:
    """Every ``iteration N/ M | key: value | ...`` log line as a dict (numbers parsed where possible)."""
    rows = []
    for line in text.splitlines():
        m = re.match(r"\s*iteration\s+(\d+)/\s*(\d+)\s*\|(.*)$", line)
        if not m:
            continue
        row: Dict[str, object] = {"iteration": int(m.group(1)), "train_iters": int(m.group(2))}
        for key, value in _FIELD.findall(m.group(3)):
            try:
                row[key.strip()] = float(value)
            except ValueError:
                row[key.strip()] = value
        rows.append(row)
    return rows


def parse_validation(text: str) -> List[float]:
    return [float(v) for v in re.findall(r"lm loss value: ([0-9.E+\-naif]+)", text)]


def parameter_count(text: str) -> int:
    m = re.search(r"number of parameters: ([\d,]+)", text)
    assert m, "no parameter summary in the log"
    return int(m.group(1).replace(",", ""))


def check_ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"exit {result.returncode}: {' '.join(result.args)}\n{result.stdout[-6000:]}"
    return result.stdout
