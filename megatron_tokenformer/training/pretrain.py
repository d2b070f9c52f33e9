"""Megatron's ``pretrain()``: flags -> environment -> process groups -> model and optimizer -> data -> train.

``pretrain_tokenformer.py`` is a thin shell over :func:`main` (any launcher runs it: ``deepspeed``,
``torchrun``, ``mpirun``, ``srun``, plain ``python``). Every check on the flags, the checkpoint and the
network runs before the process group exists; each failure ends in one line (``supervision/failures.py``).
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

from megatron_tokenformer.cli import print_error
from megatron_tokenformer.errors import EXIT_BAD_INPUT

__all__ = ["PROG", "main", "pretrain"]

PROG = "pretrain_tokenformer.py"


#: how long a rank that does not print a refusal waits before it exits: a launcher ends the whole job at the
#: first rank's exit (torchrun sends SIGTERM), which must not come before the printing rank wrote its line
QUIET_RANK_GRACE_S = 5.0


def _fail(message: str, rank: int) -> None:
    """One line ``pretrain_tokenformer.py: error: message`` when ``rank`` is 0, then exit 2 (bad input).

    Every rank sees the same refusal (the flags are the same); only ``rank`` 0 prints it, and the others
    exit :data:`QUIET_RANK_GRACE_S` later so that a launcher's end-of-job signal cannot cut the line off."""
    if rank == 0:
        print_error(PROG, message)
    else:
        time.sleep(QUIET_RANK_GRACE_S)
    raise SystemExit(EXIT_BAD_INPUT)


def main(argv: Optional[Sequence[str]] = None, start_time: Optional[float] = None) -> int:
    """The entry point's ``main``: :func:`pretrain` with the run's known failures ending in one line and an exit
    code (``supervision/failures.py``), and a stdout that cannot be written never killing a rank."""
    from megatron_tokenformer.training import output_channel  # [output_channel] a lost stdout never kills a rank
    output_channel.install()
    from megatron_tokenformer.training.supervision import failures  # [failures] known failures end in one line
    start_time = time.time() if start_time is None else start_time
    return failures.run(lambda args: pretrain(args, start_time), argv, PROG)


def pretrain(argv: Optional[Sequence[str]], start_time: float) -> int:
    """Parse and check the flags, build the model, optimizer and data, train, save (Megatron's ``pretrain``).

    ``start_time``: when the process started (``time.time()`` at the entry script's import), for the
    start-up time in the log. Returns 0; every failure it can name raises a ``TokenformerError`` or ends
    through :func:`_fail` (one line, exit 2).
    """
    from megatron_tokenformer import launch
    from megatron_tokenformer.arguments import ArgumentError, parse_args, validate_args

    try:
        env = launch.initialize_environment()
    except (ValueError, RuntimeError) as exc:
        _fail(f"cannot work out this process's rank: {exc}", 0)
    # [threads] before anything imports torch: its OpenMP runtime reads OMP_NUM_THREADS once, when loaded
    launch.configure_cpu_threads(env)
    args = parse_args(argv)

    # ---- checkpoint arguments, then validation: all before any process group exists
    checkpoint = None
    try:
        if args.load:
            from megatron_tokenformer.checkpoint_args import apply_checkpoint_args
            checkpoint = apply_checkpoint_args(args)
        validate_args(args, env.world_size)
        from megatron_tokenformer.arguments import options_from_args
        from megatron_tokenformer.training.param_token_freezing import ARG_KEY, FreezingOptions, resolve_frozen_counts
        # recorded in the arguments: checkpoints keep the frozen rows (a resume goes on freezing them)
        setattr(args, ARG_KEY, resolve_frozen_counts(options_from_args(FreezingOptions, args),
                                                     checkpoint.step_dir if checkpoint else None))
        if checkpoint is not None:  # [checkpoint_args] the same tokenizer (content) and data as the checkpoint's
            from megatron_tokenformer.checkpoint_args import ResumeInputs, check_resume_inputs
            for line in check_resume_inputs(options_from_args(ResumeInputs, args), checkpoint):
                if env.rank == 0:
                    print(line, flush=True)
    except (ArgumentError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc), env.rank)

    from megatron_tokenformer import deepspeed_boundary  # [versions] outside the tested range: one line
    if env.rank == 0:
        deepspeed_boundary.check_versions(lambda line: print(line, flush=True))
    # [launch] a multi-host job with a loopback or unreachable master, or a missing interface: one line, not a hang
    problem = launch.network_problem(env)
    if problem:
        _fail(problem, env.local_rank)  # the first rank of each host that sees it
    import deepspeed
    import torch

    from megatron_tokenformer import parallel_state
    from megatron_tokenformer.arguments import core_config_from_args, describe, engine_options
    from megatron_tokenformer.data.tokenizer import build_tokenizer
    from megatron_tokenformer.tensor_parallel import random as tp_random
    from megatron_tokenformer.training import engine as engine_lib
    from megatron_tokenformer.training import loop
    from megatron_tokenformer.training.logging import (
        TensorBoardLogger,
        count_model_parameters,
        format_parameter_summary,
        print_rank_0,
    )

    # ---- tokenizer and model config (cheap, still before the process group)
    try:
        tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size)
        config = core_config_from_args(args, tokenizer.vocab_size, checkpoint)
    except (ArgumentError, ValueError, OSError) as exc:
        _fail(str(exc), env.rank)

    backend = args.distributed_backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    from megatron_tokenformer.tensor_parallel import mappings
    if mappings.collective_guard_requested():
        mappings.install_collective_guard()  # tests: every collective through the choke point, on its device
    try:
        device_index = launch.bind_cuda_device(env, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    except ValueError as exc:
        _fail(str(exc), env.rank)
    device = engine_lib.get_device(device_index)
    # [fused norm] on CUDA, compile one tiny kernel first: a broken Triton toolchain falls back (one warning)
    from megatron_tokenformer.arguments import fused_norm_after_probe
    from megatron_tokenformer.ops.pattention_norm import probe_fused_kernels
    try:
        fused, warning = fused_norm_after_probe(args._fused_pattention_norm_explicit,
                                                config.fused_pattention_norm, device.type,
                                                lambda: probe_fused_kernels(device))
    except ArgumentError as exc:
        _fail(str(exc), 0)  # (before any process group: each failing rank says it)
    if warning and env.local_rank == 0:  # once per node (the toolchain is a node's)
        print(f"rank {env.rank}: {warning}", flush=True)
    args.fused_pattention_norm = config.fused_pattention_norm = fused
    parallel_state.set_communication_device(device)
    if device.type == "cpu":
        deepspeed_boundary.skip_cpu_shm_comm_build()
    from megatron_tokenformer.training.supervision import collective_timeout  # [timeout] bounds every collective
    timeout = collective_timeout.set_default_timeout(args.distributed_timeout_minutes)
    # [timeout] under NCCL: errors reach Python (our line), flight-recorder dumps into the --save folder
    collective_timeout.apply_nccl_environment(backend, args.save)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False, timeout=timeout)
    parallel_state.initialize_model_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                                             args.context_parallel_size)
    collective_timeout.create_diagnosis_group()
    from megatron_tokenformer.training import rank_hosts  # [rank_hosts] a failure can name the lost host
    rank_hosts.gather()
    # [save_dir] --save: lock, ownership, write probe -- before the model is built
    from megatron_tokenformer.arguments import checkpoint_options
    from megatron_tokenformer.checkpointing import save_dir as save_dir_lib
    checkpointing = checkpoint_options(args)  # (what every step records: the flags as they are from here on)
    # the lock is held until the process ends
    save_lock, run_id = save_dir_lib.prepare_save_dir(checkpointing)  # noqa: F841

    torch.manual_seed(args.seed)
    tp_random.model_parallel_seed(args.seed)

    print_rank_0(f"> launcher: {env.launcher}, world size {env.world_size} = TP {args.tensor_model_parallel_size}"
                 f" x PP {args.pipeline_model_parallel_size} x CP {args.context_parallel_size}"
                 f" x DP {args.data_parallel_size}; backend {backend}; "
                 f"gradient accumulation {args.gradient_accumulation_steps}")
    print_rank_0(f"> hosts: {rank_hosts.summary()}")
    print_rank_0(describe(args))

    engine, _, _ = engine_lib.setup_model_and_optimizer(engine_options(args), config, device)
    per_stage, total = count_model_parameters(engine.module, config)
    print_rank_0(format_parameter_summary(per_stage, total))
    if args.save and torch.distributed.get_rank() == 0:  # [save_dir] free space, a warning only
        warning = save_dir_lib.free_space_warning(args.save, args.load, sum(total.values()),
                                                  14 if (args.fp16 or args.bf16) else 16)
        if warning:
            print(warning, flush=True)

    iteration, consumed_samples = 0, 0
    if args.load:
        from megatron_tokenformer.checkpointing import file_checks
        from megatron_tokenformer.checkpointing import io as checkpoint_io
        from megatron_tokenformer.checkpointing.format import files as checkpoint_files
        try:
            step_dir = checkpoint_files.resolve_step_dir(args.load)
        except (ValueError, FileNotFoundError) as exc:
            _fail(str(exc), env.rank)
        if step_dir is not None:  # [file_checks] a truncated file: one line naming it, every rank ends
            file_checks.verify_step_files(step_dir)
        try:
            iteration, consumed_samples = checkpoint_io.load_checkpoint(engine, checkpointing, config)
        except (ValueError, FileNotFoundError) as exc:  # a checkpoint that does not fit: one clear line
            _fail(str(exc), env.rank)
        except (RuntimeError, OSError, EOFError) as exc:  # [file_checks] unreadable on this rank
            from megatron_tokenformer.training.supervision import collective_timeout
            if collective_timeout.is_collective_failure(exc):
                raise
            _fail(f"cannot load {step_dir} on rank {torch.distributed.get_rank()}: "
                  f"{(str(exc).splitlines() or [type(exc).__name__])[0]}", 0)

    from megatron_tokenformer.arguments import options_from_args
    training = options_from_args(loop.TrainingOptions, args)
    try:
        train_ds, valid_ds, _ = loop.build_datasets(options_from_args(loop.DatasetOptions, args), tokenizer)
    except (ValueError, OSError) as exc:  # [failures] bad data files: one line (every rank sees the same)
        _fail(str(exc), env.rank)
    if len(train_ds) <= consumed_samples:
        _fail(f"the training data ({len(train_ds)} samples) is used up at {consumed_samples} consumed samples; "
              f"raise --train-iters", env.rank)
    pipelined = engine_lib.is_pipeline_engine(engine)
    train_iter, valid_iter = loop.build_data_iterators(training, train_ds, valid_ds, consumed_samples, iteration,
                                                       device, pipelined, vocab_size=config.vocab_size)

    tensorboard = TensorBoardLogger(args.tensorboard_dir)
    tensorboard.add_text("arguments", describe(args).replace("\n", "  \n"))
    tensorboard.add_text("parameters", format_parameter_summary(per_stage, total).replace("\n", "  \n"))
    print_rank_0(f"> training from iteration {iteration} to {args.train_iters} "
                 f"(start-up took {time.time() - start_time:.1f} s)")
    from megatron_tokenformer.training.supervision import launcher_watch
    launcher_watch.start()  # [launcher_watch] save and exit when the launcher dies
    from megatron_tokenformer.checkpointing import io as checkpoint_io

    def save(at_iteration: int, samples: int) -> None:  # (the checkpoint records the arguments)
        checkpoint_io.save_checkpoint(engine, checkpointing, config, at_iteration, samples,
                                      tokenizer_model=args.tokenizer_model, run_id=run_id)

    iteration, consumed_samples, reason = loop.train(training, engine, config, train_iter, valid_iter, iteration,
                                                     consumed_samples, device, start_time, tensorboard, save)
    tensorboard.close()
    if device.type == "cuda":
        print_rank_0(f"> peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB allocated, "
                     f"{torch.cuda.max_memory_reserved(device) / 2 ** 30:.2f} GiB reserved (rank 0)")
    if args.exit_status_file and torch.distributed.get_rank() == 0:  # after the last save
        from megatron_tokenformer.training.supervision.exit_status import write_exit_status
        print_rank_0(f"> exit status: {write_exit_status(args.exit_status_file, iteration, args.train_iters, reason)}")
    print_rank_0(f"> done: iteration {iteration}, {consumed_samples} samples consumed ({reason}); "
                 f"total time {time.time() - start_time:.1f} s")
    if torch.distributed.is_initialized():
        mappings.barrier()
        torch.distributed.destroy_process_group()
    return 0
