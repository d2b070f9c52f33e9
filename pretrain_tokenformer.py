#!/usr/bin/env python
"""Pretrain a Tokenformer LM with tensor, pipeline and data parallelism on DeepSpeed.

Launch with any of::

    deepspeed --num_gpus 8 pretrain_tokenformer.py ...      (or --hostfile hosts)
    torchrun --nproc_per_node 8 pretrain_tokenformer.py ...
    mpirun -np 16 python pretrain_tokenformer.py ...
    srun python pretrain_tokenformer.py ...                 (inside a Slurm allocation)
    python pretrain_tokenformer.py ...                      (one process)

``python pretrain_tokenformer.py --help`` lists the (Megatron-named) flags by group.
"""

from __future__ import annotations

import sys
import time

_START_TIME = time.time()


def _fail(message: str, rank: int) -> None:
    if rank == 0:
        sys.stderr.write(f"pretrain_tokenformer.py: error: {message}\n")
        sys.stderr.flush()
    raise SystemExit(2)


def main(argv=None) -> int:
    from megatron_tokenformer import launch
    from megatron_tokenformer.arguments import ArgumentError, parse_args, validate_args

    try:
        env = launch.initialize_environment()
    except (ValueError, RuntimeError) as exc:
        _fail(f"cannot work out this process's rank: {exc}", 0)
    args = parse_args(argv)

    # ---- checkpoint arguments, then validation: all before any process group exists
    checkpoint = None
    try:
        if args.load:
            from megatron_tokenformer.checkpoint_args import apply_checkpoint_args
            checkpoint = apply_checkpoint_args(args)
        validate_args(args, env.world_size)
    except (ArgumentError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc), env.rank)

    launch.configure_cpu_threads(env)
    import torch
    import deepspeed

    from megatron_tokenformer import parallel_state
    from megatron_tokenformer.arguments import core_config_from_args, describe
    from megatron_tokenformer.data.tokenizer import build_tokenizer
    from megatron_tokenformer.tensor_parallel import random as tp_random
    from megatron_tokenformer.training import engine as engine_lib
    from megatron_tokenformer.training import loop
    from megatron_tokenformer.training.logging import (TensorBoardLogger, count_parameters,
                                                       format_parameter_summary, print_rank_0)

    # ---- tokenizer and model config (cheap, still before the process group)
    try:
        tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size)
        config = core_config_from_args(args, tokenizer.vocab_size, checkpoint)
    except (ArgumentError, ValueError, OSError) as exc:
        _fail(str(exc), env.rank)

    backend = args.distributed_backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    device = engine_lib.get_device(env.local_rank)
    if device.type == "cpu":
        engine_lib.skip_cpu_shm_comm_build()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    parallel_state.initialize_model_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size)

    torch.manual_seed(args.seed)
    tp_random.model_parallel_seed(args.seed)

    print_rank_0(f"> launcher: {env.launcher}, world size {env.world_size} = TP {args.tensor_model_parallel_size}"
                 f" x PP {args.pipeline_model_parallel_size} x DP {args.data_parallel_size}; backend {backend}; "
                 f"gradient accumulation {args.gradient_accumulation_steps}")
    print_rank_0(describe(args))

    engine, _, _ = engine_lib.setup_model_and_optimizer(args, config, device)
    per_stage, total = count_parameters(engine.module)
    print_rank_0(format_parameter_summary(per_stage, total))

    iteration, consumed_samples = 0, 0
    if args.load:
        from megatron_tokenformer.checkpointing import io as checkpoint_io
        try:
            iteration, consumed_samples = checkpoint_io.load_checkpoint(engine, args, config)
        except (ValueError, FileNotFoundError) as exc:  # a checkpoint that does not fit: one clear line
            _fail(str(exc), env.rank)

    train_ds, valid_ds, _ = loop.build_datasets(args, tokenizer)
    if len(train_ds) <= consumed_samples:
        _fail(f"the training data ({len(train_ds)} samples) is used up at {consumed_samples} consumed samples; "
              f"raise --train-iters", env.rank)
    pipelined = engine_lib.is_pipeline_engine(engine)
    train_iter, valid_iter = loop.build_data_iterators(args, train_ds, valid_ds, consumed_samples, iteration,
                                                       device, pipelined)

    tensorboard = TensorBoardLogger(args.tensorboard_dir)
    tensorboard.add_text("arguments", describe(args).replace("\n", "  \n"))
    tensorboard.add_text("parameters", format_parameter_summary(per_stage, total).replace("\n", "  \n"))
    print_rank_0(f"> training from iteration {iteration} to {args.train_iters} "
                 f"(start-up took {time.time() - _START_TIME:.1f} s)")
    iteration, consumed_samples, reason = loop.train(args, engine, config, train_iter, valid_iter, iteration,
                                                     consumed_samples, device, _START_TIME, tensorboard)
    tensorboard.close()
    print_rank_0(f"> done: iteration {iteration}, {consumed_samples} samples consumed ({reason}); "
                 f"total time {time.time() - _START_TIME:.1f} s")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
