"""Multi-GPU tests on NCCL: the collectives the one-GPU tests never run for real (on one GPU the two-rank
runs use gloo with CUDA tensors, and one-rank runs issue no collective). Need >= 2 CUDA devices; skipped
with the reason otherwise. On a 2-GPU machine ``python -m pytest -q tests/gpu`` runs them with the
one-GPU tests.

* TP 2, DP 2 (ZeRO-1) and PP 2 on NCCL each follow the one-GPU run (fp32, same seed and batches);
* a DP 2 save at iteration 3 resumed to 6 equals the straight DP 2 run (DeepSpeed's same-layout load);
* ``mappings.barrier()`` blocks the host under NCCL (issue 21 item 4);
* a stopped rank under NCCL: the other rank ends within the timeout plus the diagnosis, with the line
  naming rank 1, and the NCCL flight recorder dumps into the run folder (issue 21 item 5).
"""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.gpu.test_gpu_smoke import ARGS
from tests.helpers import train_runs

NGPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(NGPUS < 2, reason=f"needs >= 2 CUDA devices for NCCL (found {NGPUS}): "
                                                   "multi-GPU tests skipped")]

NCCL = ["--distributed-backend", "nccl"]


def _run(nproc, extra, iterations):
    out = train_runs.check_ok(train_runs.run(train_runs.torchrun(nproc, ARGS + extra), timeout=300,
                                             extra_env={"CUDA_DEVICE_MAX_CONNECTIONS": "1"}))
    rows = train_runs.parse_iterations(out)
    assert len(rows) == iterations, out[-3000:]
    assert "peak GPU memory" in out
    if nproc > 1:
        assert "backend nccl" in out, out[-3000:]
    return [r["lm loss"] for r in rows]


@pytest.fixture(scope="module")
def one_gpu():
    return _run(1, ["--train-iters", "6"], 6)


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 1), (1, 2)], ids=["tp2", "dp2", "pp2"])
def test_two_gpus_follow_one_gpu(one_gpu, tp, pp):
    losses = _run(2, ["--train-iters", "6"] + train_runs.layout_args(tp, pp) + NCCL, 6)
    assert losses == pytest.approx(one_gpu, rel=1e-4)


def test_dp2_save_and_resume_on_nccl(tmp_path):
    straight = _run(2, ["--train-iters", "6"] + NCCL, 6)
    save = str(tmp_path / "ckpt")
    first = _run(2, ["--train-iters", "6", "--exit-interval", "3", "--save", save] + NCCL, 3)
    second = _run(2, ["--train-iters", "6", "--save", save, "--load", save] + NCCL, 3)
    assert first + second == pytest.approx(straight, rel=1e-5)
    import json
    with open(os.path.join(save, "global_step6", "tokenformer_checkpoint.json")) as f:
        meta = json.load(f)
    assert meta["optimizer"]["adam_step"] in ("param_group", "parameter")  # apex or torch, recorded


BARRIER = r"""
import os, sys, time
import torch, torch.distributed as dist
from megatron_tokenformer import parallel_state
from megatron_tokenformer.tensor_parallel import mappings
rank = int(os.environ["RANK"]); torch.cuda.set_device(rank)
dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
parallel_state.set_communication_device(torch.device("cuda", rank))
folder = sys.argv[1]
if rank == 1:
    time.sleep(3)
    open(os.path.join(folder, "late"), "w").close()
mappings.barrier()
if rank == 0:
    print("after barrier:", sorted(os.listdir(folder)), flush=True)
dist.destroy_process_group()
"""


def test_barrier_blocks_the_host_under_nccl(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(train_runs.free_port()), "--no-python", sys.executable, "-c", BARRIER, str(tmp_path)]
    out = train_runs.check_ok(train_runs.run(cmd, timeout=180))
    assert "after barrier: ['late']" in out, out[-3000:]


STOP = r"""
import os, signal, sys, time
from datetime import timedelta
import torch, torch.distributed as dist
from megatron_tokenformer.training.supervision import collective_timeout, failures
rank = int(os.environ["RANK"]); torch.cuda.set_device(rank)
collective_timeout.set_default_timeout(float(sys.argv[2]))
collective_timeout.apply_nccl_environment("nccl", sys.argv[1])
dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
collective_timeout.create_diagnosis_group()
x = torch.ones(1, device="cuda")
dist.all_reduce(x); torch.cuda.synchronize()
if rank == 1:
    print("stopping", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
time.sleep(1)
def main(argv):
    for _ in range(3):
        dist.all_reduce(x)
        x.item()
    return 0
failures.run(main, [])
"""


def test_stopped_rank_under_nccl_is_named_and_dumped(tmp_path):
    timeout_min = 0.25
    env = dict(os.environ, PYTHONPATH=train_runs.ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = []
    port = str(train_runs.free_port())
    start = time.time()
    try:
        for rank in (0, 1):
            procs.append(subprocess.Popen([sys.executable, "-c", STOP, str(tmp_path), str(timeout_min)],
                                          env=dict(env, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                                                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        out, _ = procs[0].communicate(timeout=timeout_min * 60 + 120)
        took = time.time() - start
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
            p.wait()
    assert procs[0].returncode == 1, out[-3000:]
    assert "rank 1 stopped answering or ended" in out and "stopped (SIGSTOP" in out, out[-3000:]
    assert took < timeout_min * 60 + 30 + 60, took
    dumps = os.listdir(tmp_path / "nccl_flight_recorder")
    assert any(name.startswith("rank_") for name in dumps), dumps
