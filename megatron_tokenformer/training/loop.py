"""The pretraining loop: data iterators, train step, evaluation, logging, exits and checkpoint calls.

Exits: after ``--train-iters``; after an iteration that is a multiple of ``--exit-interval``; once
``--exit-duration-in-mins`` have passed; on SIGTERM, SIGINT, SIGHUP or SIGUSR1 (Slurm's pre-emption
warning, see ``#SBATCH --signal``); when the rank's launcher ended (training/supervision/launcher_watch.py) or its
stdout/stderr could not be written (training/output_channel.py). All ranks agree on the decision (one
all-reduce of a small vector: per kind of request, the lowest rank that made it), finish the
iteration, save a checkpoint when ``--save`` is given, and return normally. Whichever rank noticed
first, every rank knows the agreed kind of request: rank 0 names it in its ``exiting at iteration``
line and in ``--exit-status-file``.

Every micro-batch's token ids are checked on the host before use (:mod:`.data_checks`); a bad one
ends every rank at the next iteration where the ranks agree (before it is logged or saved).
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Tuple

import torch

from megatron_tokenformer import parallel_state
from megatron_tokenformer.tensor_parallel.context_parallel import split_batch_on_this_rank
from megatron_tokenformer.training import data_checks, output_channel
from megatron_tokenformer.training import flops as flops_lib
from megatron_tokenformer.training.logging import (
    TensorBoardLogger,
    format_eval_line,
    format_train_line,
    is_logging_rank,
    print_rank_0,
    print_rank_last,
)
from megatron_tokenformer.training.supervision import launcher_watch
from megatron_tokenformer.training.supervision.numerics import NumericsCheck, NumericsOptions

__all__ = ["DatasetOptions", "TrainingOptions", "build_datasets", "get_batch", "build_data_iterators", "train_step",
           "evaluate", "train", "ExitSignalHandler", "EXIT_KINDS", "local_exit_request", "agreed_exit_reason"]


@dataclass(frozen=True)
class DatasetOptions:
    """What :func:`build_datasets` sizes and reads: the data flags, the seed, and the sample counts' factors."""

    data_path: Optional[List[str]]
    split: str
    mock_data: bool
    data_cache_path: Optional[str]
    seq_length: int
    seed: int
    train_iters: int
    global_batch_size: int
    eval_interval: int
    eval_iters: int


@dataclass(frozen=True)
class TrainingOptions:
    """The flags (and derived values) the loop reads: iterations and batch sizes, logging, evaluation, saving
    and exit intervals, precision and its checks, the data-loader workers, MFU's peak."""

    train_iters: int
    global_batch_size: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    seq_length: int
    lr: float
    log_interval: int = 100
    eval_interval: int = 1000
    eval_iters: int = 100
    save: Optional[str] = None
    save_interval: Optional[int] = None
    exit_interval: Optional[int] = None
    exit_duration_in_mins: Optional[float] = None
    peak_tflops: Optional[float] = None
    bf16: bool = False
    fp16: bool = False
    check_for_nan_in_loss_and_grad: bool = True
    max_skipped_iterations: int = 100
    tensor_model_parallel_size: int = 1
    num_workers: int = 2


# --------------------------------------------------------------------------- data


def get_batch(batch: dict, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``{"text": [b, s + 1]}`` -> tokens [b, s], labels [b, s] (long), loss_mask [b, s] (float, ones)."""
    text = batch["text"]
    if not torch.is_tensor(text):
        text = torch.as_tensor(text)
    text = text.to(device=device, dtype=torch.long, non_blocking=True)
    tokens = text[:, :-1].contiguous()
    labels = text[:, 1:].contiguous()
    loss_mask = torch.ones(labels.shape, dtype=torch.float32, device=device)
    return tokens, labels, loss_mask


def _batches(loader, device, pipelined: bool, vocab_size: Optional[int] = None, split: str = "training") -> Iterator:
    for batch in loader:
        # [data_checks] ids outside the vocabulary: found on the host, replaced, agreed at the next agree()
        batch = dict(batch, text=data_checks.check_batch(batch, loader.dataset, vocab_size, split))
        tokens, labels, loss_mask = get_batch(batch, device)
        # context parallel: this rank's two chunks of every sequence (tensor_parallel/context_parallel.py)
        tokens, labels, loss_mask = split_batch_on_this_rank(tokens, labels, loss_mask)
        if pipelined:
            yield (tokens,), (labels, loss_mask)
        else:
            yield tokens, labels, loss_mask


def build_datasets(options: DatasetOptions, tokenizer):
    """(train, valid, test) datasets sized for the run (Megatron's sample counts)."""
    from megatron_tokenformer.data import gpt_dataset
    gbs = options.global_batch_size
    train_samples = options.train_iters * gbs
    eval_runs = options.train_iters // options.eval_interval + 1
    valid_samples = eval_runs * options.eval_iters * gbs
    test_samples = options.eval_iters * gbs
    if options.mock_data:
        vocab = tokenizer.vocab_size
        train = gpt_dataset.MockGPTDataset(train_samples, options.seq_length, vocab, seed=options.seed)
        valid = gpt_dataset.MockGPTDataset(valid_samples, options.seq_length, vocab, seed=options.seed + 1) \
            if valid_samples > 0 else None
        return train, valid, None
    return gpt_dataset.build_train_valid_test_datasets(
        options.data_path, options.split, options.seq_length, (train_samples, valid_samples, test_samples),
        options.seed, cache_dir=options.data_cache_path, vocab_size=tokenizer.vocab_size)


def build_data_iterators(options: TrainingOptions, train_ds, valid_ds, consumed_samples: int, iteration: int, device,
                         pipelined: bool, vocab_size: Optional[int] = None):
    """Iterators over this rank's micro-batches (Megatron's sampler order; resumable).

    ``vocab_size``: every batch's ids are checked against ``[0, vocab_size)`` (:mod:`.data_checks`).
    """
    from megatron_tokenformer.data.samplers import build_pretraining_data_loader
    # pinned host memory makes the host-to-device copy of a batch asynchronous (CUDA only)
    pin = torch.device(device).type == "cuda"
    dp_rank = parallel_state.get_data_parallel_rank()
    dp = parallel_state.get_data_parallel_world_size()
    train_loader = build_pretraining_data_loader(train_ds, consumed_samples, options.micro_batch_size, dp_rank, dp,
                                                 num_workers=options.num_workers, pin_memory=pin)
    train_iter = _batches(train_loader, device, pipelined, vocab_size, "training")
    valid_iter = None
    if valid_ds is not None and options.eval_iters > 0:
        consumed_valid = (iteration // options.eval_interval) * options.eval_iters * options.global_batch_size
        consumed_valid = consumed_valid % len(valid_ds)
        valid_loader = build_pretraining_data_loader(valid_ds, consumed_valid, options.micro_batch_size, dp_rank, dp,
                                                     num_workers=options.num_workers, pin_memory=pin)
        valid_iter = _batches(valid_loader, device, pipelined, vocab_size, "validation")
    return train_iter, valid_iter


# --------------------------------------------------------------------------- steps


def train_step(engine, data_iter, gradient_accumulation_steps: int, pipelined: bool) -> torch.Tensor:
    """One optimizer step over ``gradient_accumulation_steps`` micro-batches.

    Returns this iteration's loss: for PP = 1 the mean over this rank's micro-batches (not yet
    averaged over data-parallel ranks); for PP > 1 DeepSpeed's loss, already averaged over the
    micro-batches and the data-parallel group (and broadcast to every stage).
    """
    freezer = getattr(engine, "param_token_freezer", None)  # --train-only-new-param-tokens
    if freezer is not None and not freezer.started:
        freezer.start(engine)
    if pipelined:
        loss = engine.train_batch(data_iter=data_iter).detach().float()
        if freezer is not None:
            freezer.after_step()
        return loss
    total = None
    for _ in range(gradient_accumulation_steps):
        tokens, labels, loss_mask = next(data_iter)
        loss = engine(tokens, labels, loss_mask)
        engine.backward(loss)
        engine.step()
        total = loss.detach().float() if total is None else total + loss.detach().float()
    if freezer is not None:  # after the optimizer step of the last micro-batch
        freezer.after_step()
    return total / gradient_accumulation_steps


def _dp_average(value: torch.Tensor) -> torch.Tensor:
    if parallel_state.get_data_parallel_world_size() > 1:
        from megatron_tokenformer.tensor_parallel.mappings import all_reduce_over
        device = value.device
        value = all_reduce_over(value.to(parallel_state.get_communication_device()), "data").to(device)
        value /= parallel_state.get_data_parallel_world_size()
    return value


@torch.no_grad()
def evaluate(engine, valid_iter, options: TrainingOptions, pipelined: bool) -> float:
    """Mean validation loss over ``--eval-iters`` global batches (averaged over data-parallel ranks)."""
    losses = []
    if pipelined:
        for _ in range(options.eval_iters):
            losses.append(engine.eval_batch(data_iter=valid_iter).detach().float())
        engine.module.train()
        data_checks.agree()  # [data_checks] no loss of a bad batch is reported
        return float(torch.stack(losses).mean())
    engine.eval()
    for _ in range(options.eval_iters):
        for _ in range(options.gradient_accumulation_steps):
            tokens, labels, loss_mask = next(valid_iter)
            losses.append(engine(tokens, labels, loss_mask).detach().float())
    engine.train()
    data_checks.agree()  # [data_checks] no loss of a bad batch is reported
    return float(_dp_average(torch.stack(losses).mean()))


# --------------------------------------------------------------------------- exits


class ExitSignalHandler:
    """Records SIGTERM / SIGINT / SIGHUP / SIGUSR1; the loop saves and exits at the iteration's end.

    SIGINT is Ctrl-C (sent to the whole foreground process group, the ranks included); SIGHUP is the
    terminal or session that went away. The same signal again, :data:`REPEAT_AFTER_S` seconds or more
    after the first, terminates at once (its default action), so a run stuck in a collective can still
    be stopped by sending SIGTERM (or pressing Ctrl-C) twice. A repeat sooner than that is the same
    request delivered twice -- DeepSpeed's pdsh runner runs ``pkill`` on every host and a per-host
    launcher then signals its whole process tree from nested handlers -- and is ignored.
    """

    SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1")
    REPEAT_AFTER_S = 5.0

    def __init__(self, clock=time.monotonic):
        self.received: Optional[str] = None
        self._clock = clock
        self._first = {}  # signal name -> when it first arrived
        self._previous = {}
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                try:
                    self._previous[sig] = signal.signal(sig, self._handle)
                except ValueError:  # not the main thread
                    pass

    def _handle(self, signum, _frame):
        name = signal.Signals(signum).name
        now = self._clock()
        if name in self._first:
            if name != "SIGUSR1" and now - self._first[name] >= self.REPEAT_AFTER_S:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return
        self._first[name] = now
        if self.received is None:
            self.received = name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


#: The kinds of exit request the ranks agree on, in order of precedence (the first one present is the
#: reason every rank reports).
EXIT_KINDS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1", "launcher", "output", "duration")


def local_exit_request(handler: ExitSignalHandler, options: TrainingOptions,
                       start_time: float) -> Optional[Tuple[str, str]]:
    """``(kind, description)`` of this rank's own reason to stop now, or None."""
    if handler.received is not None:
        return handler.received, f"signal {handler.received}"
    if launcher_watch.reason() is not None:
        return "launcher", launcher_watch.reason()
    if output_channel.reason() is not None:
        return "output", output_channel.reason()
    if options.exit_duration_in_mins is not None and (time.time() - start_time) / 60.0 > options.exit_duration_in_mins:
        return "duration", f"--exit-duration-in-mins {options.exit_duration_in_mins}"
    return None


def _agree_on_exit(local_kind: Optional[str], device) -> Optional[Tuple[str, int]]:
    """``(kind, lowest rank that requested it)`` of the first kind of :data:`EXIT_KINDS` that any rank
    requested, the same on every rank; None when no rank wants to exit (all-reduce MAX over the world
    of one entry per kind: world size - rank on a requesting rank, else 0)."""
    if not torch.distributed.is_initialized():
        return (local_kind, 0) if local_kind is not None else None
    from megatron_tokenformer.tensor_parallel.mappings import all_reduce_over
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    requests = torch.zeros(len(EXIT_KINDS), device=parallel_state.get_communication_device())
    if local_kind is not None:
        requests[EXIT_KINDS.index(local_kind)] = float(world - rank)
    requests = all_reduce_over(requests, "world", op="max").cpu()
    for kind, value in zip(EXIT_KINDS, requests.tolist()):
        if value > 0:
            return kind, world - int(round(value))
    return None


def agreed_exit_reason(kind: str, requester: int, local: Optional[Tuple[str, str]], options: TrainingOptions) -> str:
    """What a rank reports for the agreed exit: its own description when it made the same kind of
    request, else a description of the requester's (signals and the time limit read the same on every
    rank; the launcher and the output channel are named with the rank that noticed)."""
    if local is not None and local[0] == kind:
        return local[1]
    if kind == "launcher":
        return f"the launcher ended (noticed by rank {requester})"
    if kind == "output":
        return f"the output channel closed (noticed by rank {requester})"
    if kind == "duration":
        return f"--exit-duration-in-mins {options.exit_duration_in_mins}"
    return f"signal {kind}"


def exit_check_due(iteration: int, options: TrainingOptions) -> bool:
    """Whether the ranks agree on an exit after ``iteration``: at every ``--log-interval``, save and exit
    interval, and the last iteration -- not every iteration (the agreement waits for the device)."""
    for interval in (options.log_interval, options.save_interval if options.save else None, options.exit_interval):
        if interval and iteration % interval == 0:
            return True
    return iteration >= options.train_iters


def _synchronize(device) -> None:
    """Wait for the device's queued work (before reading a clock); nothing on the CPU."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- the loop


def _loss_scale(engine, options: TrainingOptions) -> float:
    if not options.fp16:
        return 1.0
    from megatron_tokenformer.deepspeed_boundary import current_loss_scale
    return current_loss_scale(engine.optimizer)


def _grad_norm(engine) -> Optional[float]:
    try:
        value = engine.get_global_grad_norm()
    except Exception:
        return None
    if value is None:
        return None
    value = float(value)
    return value if value >= 0 else float("nan")


def _check_before_save(numerics, engine, pending_losses, iteration: int, pipelined: bool) -> None:
    """The losses not yet checked at a log line, and the gradient norm: no NaN weights are saved."""
    if not numerics.check_nan:
        return
    losses = numerics.stack(pending_losses)
    if losses is not None and not pipelined:
        losses = _dp_average(losses)
    numerics.check_values(losses, iteration, _grad_norm(engine))


def train(options: TrainingOptions, engine, config, train_iter, valid_iter, iteration: int, consumed_samples: int,
          device, start_time: float, tensorboard: Optional[TensorBoardLogger] = None,
          save: Optional[Callable[[int, int], None]] = None) -> Tuple[int, int, str]:
    """Run until ``--train-iters`` or an exit condition. Returns (iteration, consumed_samples, reason).

    ``save(iteration, consumed_samples)``: writes a checkpoint into ``--save`` (the entry point's
    ``checkpointing.io.save_checkpoint``); called at ``--save-interval`` and at the end when ``--save`` is set.
    """
    from megatron_tokenformer.training.engine import is_pipeline_engine
    pipelined = is_pipeline_engine(engine)
    tensorboard = tensorboard or TensorBoardLogger(None)
    gbs = options.global_batch_size
    tokens_per_iter = gbs * options.seq_length
    padded_vocab = config.padded_vocab_size(options.tensor_model_parallel_size)
    hw_flops_per_token = flops_lib.training_flops_per_token(config, padded_vocab, hardware=True)
    model_flops_per_token = flops_lib.training_flops_per_token(config, padded_vocab, hardware=False)
    tf32 = bool(torch.backends.cuda.matmul.allow_tf32) or torch.get_float32_matmul_precision() != "highest"
    peak = flops_lib.peak_tflops_for_device(options.peak_tflops,
                                            flops_lib.training_precision(options.bf16, options.fp16, tf32))
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1

    handler = ExitSignalHandler()
    # [numerics] NaN/Inf and fp16 skips end the run
    numerics = NumericsCheck(NumericsOptions(options.fp16, options.check_for_nan_in_loss_and_grad,
                                             options.max_skipped_iterations), engine.skipped_steps)
    interval_losses = []
    interval_start = time.time()
    interval_iters = 0
    skipped_at_start = engine.skipped_steps
    last_saved = None
    reason = "train-iters"
    logger_rank = is_logging_rank()
    my_rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0

    try:
        while iteration < options.train_iters:
            lr = engine.lr_scheduler.get_lr() if engine.lr_scheduler is not None else options.lr
            loss = train_step(engine, train_iter, options.gradient_accumulation_steps, pipelined)
            iteration += 1
            consumed_samples += gbs
            numerics.after_step(engine.skipped_steps, iteration)
            interval_losses.append(loss)
            interval_iters += 1
            if exit_check_due(iteration, options):  # before this iteration is logged or saved
                data_checks.agree()  # [data_checks] a batch with ids outside the vocabulary ends the run

            if iteration % options.log_interval == 0 or iteration == options.train_iters:
                losses = torch.stack(interval_losses)
                if not pipelined:
                    losses = _dp_average(losses)
                grad_norm = _grad_norm(engine)
                numerics.check_values(losses, iteration, grad_norm)
                _synchronize(device)  # the interval's kernels are finished before it is timed
                elapsed = time.time() - interval_start
                if logger_rank:
                    finite = torch.isfinite(losses)
                    nan_iters = int((~finite).sum())
                    mean_loss = float(losses[finite].mean()) if finite.any() else float("nan")
                    skipped = engine.skipped_steps - skipped_at_start
                    tokens_per_sec = tokens_per_iter * interval_iters / max(elapsed, 1e-9)
                    tflops = tokens_per_sec * hw_flops_per_token / world / 1e12
                    mfu = (tokens_per_sec * model_flops_per_token / world / 1e12 / peak) if peak else None
                    loss_scale = _loss_scale(engine, options)
                    print(format_train_line(iteration, options.train_iters, consumed_samples,
                                            1000.0 * elapsed / interval_iters, lr, gbs, mean_loss, loss_scale,
                                            grad_norm, skipped, nan_iters, tokens_per_sec, tflops, mfu), flush=True)
                    tensorboard.add_scalars({
                        "lm loss": mean_loss, "learning-rate": lr, "grad-norm": grad_norm,
                        "loss-scale": loss_scale, "batch-size": gbs, "tokens-per-sec": tokens_per_sec,
                        "tflops-per-gpu": tflops, "mfu": mfu, "skipped-iterations": skipped,
                        "nan-iterations": nan_iters, "consumed-samples": consumed_samples,
                    }, iteration)
                interval_losses = []
                interval_iters = 0
                skipped_at_start = engine.skipped_steps
                interval_start = time.time()

            if valid_iter is not None and options.eval_iters > 0 and iteration % options.eval_interval == 0:
                val_loss = evaluate(engine, valid_iter, options, pipelined)
                print_rank_last(format_eval_line(iteration, val_loss))
                tensorboard.add_scalars({"lm loss validation": val_loss,
                                         "lm loss validation ppl": math.exp(min(val_loss, 20.0))}, iteration)
                interval_start = time.time()  # do not count evaluation as training time

            if options.save and options.save_interval and iteration % options.save_interval == 0:
                _check_before_save(numerics, engine, interval_losses, iteration, pipelined)
                save(iteration, consumed_samples)
                last_saved = iteration
                interval_start = time.time()

            # ---- exit conditions (agreed by all ranks)
            # The agreement is a host sync: only at iterations where the host waits anyway (logging,
            # saving) -- a signal is acted on within --log-interval iterations.
            if exit_check_due(iteration, options):
                local = local_exit_request(handler, options, start_time)
                agreed = _agree_on_exit(local[0] if local else None, device)
                if agreed and iteration < options.train_iters:
                    kind, requester = agreed
                    reason = agreed_exit_reason(kind, requester, local, options)
                    if requester == my_rank != 0 and local is not None and kind in ("launcher", "output"):
                        print(f"> rank {my_rank}: {local[1]}", flush=True)  # the detail rank 0 cannot name
                    break
            if options.exit_interval and iteration % options.exit_interval == 0 and iteration < options.train_iters:
                reason = f"--exit-interval {options.exit_interval}"
                break

        # the final save runs with the signal handler still installed: a signal now is the same request
        if reason != "train-iters":
            print_rank_0(f"exiting at iteration {iteration} ({reason})")
        elif valid_iter is not None and options.eval_iters > 0 and iteration % options.eval_interval != 0:
            val_loss = evaluate(engine, valid_iter, options, pipelined)
            print_rank_last(format_eval_line(iteration, val_loss, name="validation (end of training)"))
            tensorboard.add_scalars({"lm loss validation": val_loss,
                                     "lm loss validation ppl": math.exp(min(val_loss, 20.0))}, iteration)
        if options.save and last_saved != iteration:
            _check_before_save(numerics, engine, interval_losses, iteration, pipelined)
            save(iteration, consumed_samples)
        tensorboard.flush()
    finally:
        handler.restore()
    return iteration, consumed_samples, reason
