"""The training loop's host synchronisation points and data-loader settings (training/loop.py).

A stand-in engine (a linear model behind DeepSpeed's engine interface) runs the real ``train()`` on
CPU; the collectives that make the host wait (exit agreement, data-parallel loss averaging) are
recorded per iteration.
"""


import pytest
import torch

from megatron_tokenformer.config import TokenformerConfig
from megatron_tokenformer.data.gpt_dataset import MockGPTDataset
from megatron_tokenformer.training import loop
from tests.helpers import dist_pool


class StandInEngine(torch.nn.Module):
    """forward(tokens, labels, mask) -> scalar loss; backward/step as DeepSpeed's engine names them."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.lr_scheduler = None
        self.skipped_steps = 0
        self.steps = 0

    def forward(self, tokens, labels, loss_mask):
        return (self.weight * tokens.float().mean() - labels.float().mean()) ** 2

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.steps += 1

    def get_global_grad_norm(self):
        return 1.0


def _args(**overrides):
    base = dict(global_batch_size=2, micro_batch_size=1, gradient_accumulation_steps=2, seq_length=8, train_iters=10,
                log_interval=4, eval_interval=1000, eval_iters=0, save=None, save_interval=None, exit_interval=None,
                exit_duration_in_mins=None, peak_tflops=None, bf16=False, fp16=False, lr=1e-3,
                tensor_model_parallel_size=1, num_workers=0, check_for_nan_in_loss_and_grad=True,
                max_skipped_iterations=100)
    base.update(overrides)
    return loop.TrainingOptions(**base)


def test_host_waits_only_at_log_intervals(monkeypatch, capsys):
    args = _args()
    cfg = TokenformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, seq_length=8, vocab_size=32,
                            qkv_num_param_tokens=4, proj_num_param_tokens=4, ffn_num_param_tokens=8)
    engine = StandInEngine()
    train_iter, _ = loop.build_data_iterators(args, MockGPTDataset(40, 8, 32), None, 0, 0, torch.device("cpu"),
                                              pipelined=False)
    synced = []  # iterations (completed so far) at which a host-waiting collective ran
    monkeypatch.setattr(loop, "_agree_on_exit", lambda flag, device: synced.append(("exit", engine.steps // 2)))
    real_average = loop._dp_average
    monkeypatch.setattr(loop, "_dp_average", lambda v: (synced.append(("loss", engine.steps // 2)), real_average(v))[1])
    iteration, consumed, reason = loop.train(args, engine, cfg, train_iter, None, 0, 0, torch.device("cpu"), 0.0)
    assert (iteration, consumed, reason) == (10, 20, "train-iters")
    assert engine.steps == 20  # every micro-batch stepped
    logged = [4, 8, 10]  # every --log-interval and the last iteration
    assert synced == [item for it in logged for item in (("loss", it), ("exit", it))]
    out = capsys.readouterr().out
    assert [int(line.split()[1].split("/")[0]) for line in out.splitlines() if line.startswith(" iteration")] == logged


@pytest.mark.parametrize("overrides, due", [
    ({}, [4, 8, 10]),
    ({"save": "/ckpt", "save_interval": 3}, [3, 4, 6, 8, 9, 10]),
    ({"save_interval": 3}, [4, 8, 10]),  # no --save: nothing is saved, nothing to wait for
    ({"exit_interval": 5}, [4, 5, 8, 10]),
])
def test_exit_check_due(overrides, due):
    args = _args(**overrides)
    assert [i for i in range(1, 11) if loop.exit_check_due(i, args)] == due


def test_data_loader_pins_memory_only_for_cuda(monkeypatch):
    from megatron_tokenformer.data import samplers
    seen = []
    real = samplers.build_pretraining_data_loader

    def spy(*a, **k):
        seen.append((k["num_workers"], k["pin_memory"]))
        return real(*a, **k)

    monkeypatch.setattr(samplers, "build_pretraining_data_loader", spy)
    ds = MockGPTDataset(8, 8, 32)
    loop.build_data_iterators(_args(num_workers=2, eval_iters=1), ds, ds, 0, 0, torch.device("cpu"), False)
    loop.build_data_iterators(_args(num_workers=2, eval_iters=1), ds, ds, 0, 0, torch.device("cuda", 0), False)
    assert seen == [(2, False), (2, False), (2, True), (2, True)]


def test_num_workers_default_is_two():
    from megatron_tokenformer.arguments import parse_args
    assert parse_args(["--num-layers", "1"]).num_workers == 2


# --------------------------------------------------------------------------- exit requests

def _check_agreement(rank, world, requests):
    """Every rank's view of the agreed exit, when rank r requests ``requests.get(r)``."""
    return loop._agree_on_exit(requests.get(rank), torch.device("cpu"))


world_pool = dist_pool.pool_fixture(4)


@pytest.mark.parametrize("requests, agreed", [
    ({}, None),
    ({1: "launcher"}, ("launcher", 1)),                    # rank 0 did not notice: it still learns what, and who
    ({3: "SIGUSR1"}, ("SIGUSR1", 3)),                      # Slurm's warning reached rank 3 first
    ({2: "output", 3: "output"}, ("output", 2)),           # the lowest requesting rank is named
    ({1: "launcher", 3: "SIGTERM"}, ("SIGTERM", 3)),       # a signal takes precedence over the launcher
    ({0: "duration", 2: "SIGINT"}, ("SIGINT", 2)),
])
def test_exit_agreement_carries_the_kind_and_the_requesting_rank(world_pool, requests, agreed):
    assert world_pool.run(_check_agreement, requests) == [agreed] * 4


def test_agreed_exit_reason_on_a_rank_that_did_not_notice():
    args = _args(exit_duration_in_mins=0.5)
    assert loop.agreed_exit_reason("SIGUSR1", 3, None, args) == "signal SIGUSR1"  # what --exit-status-file says
    assert loop.agreed_exit_reason("launcher", 1, None, args) == "the launcher ended (noticed by rank 1)"
    assert loop.agreed_exit_reason("output", 2, None, args) == "the output channel closed (noticed by rank 2)"
    assert loop.agreed_exit_reason("duration", 1, None, args) == "--exit-duration-in-mins 0.5"
    own = ("launcher", "the launcher ended (pid 12: deepspeed)")
    assert loop.agreed_exit_reason("launcher", 0, own, args) == own[1]
    assert loop.agreed_exit_reason("SIGTERM", 1, own, args) == "signal SIGTERM"  # a different kind won


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def _deliver(sig):
    import os
    import time
    os.kill(os.getpid(), sig)
    time.sleep(0.05)  # the handler runs in the main thread at the next bytecode


def test_signal_handler_records_sigterm_sigint_sighup_and_ignores_a_quick_repeat():
    import signal
    clock = _Clock()
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    handler = loop.ExitSignalHandler(clock=clock)
    try:
        _deliver(signal.SIGINT)                 # Ctrl-C: an exit request, not a KeyboardInterrupt
        assert handler.received == "SIGINT"
        _deliver(signal.SIGHUP)                 # the terminal went away: still alive
        _deliver(signal.SIGTERM)                # the launcher passes the signal on: a different signal
        clock.now += 1.0
        _deliver(signal.SIGTERM)                # the same request again (pkill on every host): ignored
        _deliver(signal.SIGINT)
        assert handler.received == "SIGINT"     # the first one is the reason
    finally:
        handler.restore()
    # the handlers the process had before (SIG_DFL in a fresh process; SIGHUP ignored under nohup)
    assert {sig: signal.getsignal(sig) for sig in before} == before


REPEAT = """
import os, signal, sys, time
from megatron_tokenformer.training import loop
from tests.helpers import dist_pool
clock = [0.0]
handler = loop.ExitSignalHandler(clock=lambda: clock[0])
os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.1)
print(handler.received, flush=True)
clock[0] = float(sys.argv[1])
os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.5)
print("alive", flush=True)
"""


@pytest.mark.parametrize("after_s, survives", [(4.0, True), (5.0, False)])
def test_a_second_sigterm_seconds_later_terminates_at_once(after_s, survives):
    """A run stuck in a collective still ends on SIGTERM sent twice (a repeat ``REPEAT_AFTER_S`` or more later)."""
    import signal
    import subprocess
    import sys

    from tests.helpers import train_runs
    r = subprocess.run([sys.executable, "-c", REPEAT, str(after_s)], env=train_runs.env(), capture_output=True,
                       text=True, timeout=120)
    assert r.stdout.splitlines()[0] == "SIGTERM", r.stdout + r.stderr
    if survives:
        assert r.returncode == 0 and r.stdout.splitlines()[1:] == ["alive"], r.stdout + r.stderr
    else:
        assert r.returncode == -signal.SIGTERM and "alive" not in r.stdout, r.stdout + r.stderr


def test_closed_stdout_is_an_exit_request_not_a_crash(monkeypatch):
    """The logging rank's reader goes away: the log line at iteration 4 is dropped, the ranks agree to stop
    there (and would save), train() returns normally naming the reason."""
    import os
    import sys

    from megatron_tokenformer.training import output_channel
    r, w = os.pipe()
    os.close(r)
    raw = os.fdopen(w, "w", buffering=1)
    output_channel.uninstall()
    monkeypatch.setattr(sys, "stdout", output_channel.GuardedStream(raw, "stdout"))
    try:
        args = _args(train_iters=1000)
        cfg = TokenformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, seq_length=8, vocab_size=32,
                                qkv_num_param_tokens=4, proj_num_param_tokens=4, ffn_num_param_tokens=8)
        engine = StandInEngine()
        train_iter, _ = loop.build_data_iterators(args, MockGPTDataset(4000, 8, 32), None, 0, 0,
                                                  torch.device("cpu"), pipelined=False)
        iteration, consumed, reason = loop.train(args, engine, cfg, train_iter, None, 0, 0, torch.device("cpu"), 0.0)
    finally:
        output_channel.uninstall()
        raw.close()
    assert (iteration, consumed, reason) == (4, 8, "the output channel closed (stdout: Broken pipe)")
