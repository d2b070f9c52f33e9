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

import time

_START_TIME = time.time()  # before the imports: the log's start-up time includes them


def main(argv=None) -> int:
    from megatron_tokenformer.training.pretrain import main as pretrain_main
    return pretrain_main(argv, _START_TIME)


if __name__ == "__main__":
    try:
        code = main()
    except SystemExit as exc:
        code = exc.code
    from megatron_tokenformer.training.supervision.failures import end_process

    end_process(code)  # exit handlers run, then no interpreter teardown of torch's objects (failures.py)
