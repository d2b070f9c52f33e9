#!/usr/bin/env python
"""Reshard a checkpoint to another TP/PP/DP layout and/or grow its Tokenformer (tokens, layers).

Reads any checkpoint pretrain_tokenformer.py or this tool wrote, on one machine without GPUs or
process groups, and writes a new checkpoint directory that ``pretrain_tokenformer.py --load`` resumes
at the target layout: same iteration, consumed samples and LR-schedule position (unless
--reset-iteration), optimizer state carried over (fp32 master weights, Adam moments, step).

Examples::

    # TP 2 -> 1, PP 1 -> 2, DP 4 -> 2
    python tools/expand_checkpoint.py --load ckpt --save ckpt_tp1pp2 \\
        --target-tensor-model-parallel-size 1 --target-pipeline-model-parallel-size 2 \\
        --target-data-parallel-size 2
    # twice the parameter tokens everywhere, and 12 -> 24 layers (new blocks interleaved)
    python tools/expand_checkpoint.py --load ckpt --save ckpt_big --param-token-growth-factor 2 --num-layers 24
    # see what would happen
    python tools/expand_checkpoint.py --load ckpt --save ckpt_big --ffn-num-param-tokens 8192 --dry-run

The logic lives in megatron_tokenformer.checkpointing (expand.py, grow.py, reshard.py); see
docs/checkpoints.md.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_tokenformer.cli import run_tool  # noqa: E402


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _positions(text: str):
    try:
        return [int(p) for p in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="expand_checkpoint.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    g = p.add_argument_group("input and output")
    g.add_argument("--load", required=True, help="checkpoint directory to read (never written to)")
    g.add_argument("--iteration", type=int, default=None, help="step to read (default: the one `latest` names)")
    g.add_argument("--save", required=True, help="new checkpoint directory (must not exist or be empty)")
    g.add_argument("--overwrite", action="store_true", help="replace a non-empty --save directory")
    g.add_argument("--dry-run", action="store_true", help="print the plan (every tensor, shapes, bytes); write nothing")
    g.add_argument("--no-fsync", action="store_true",
                   help="do not fsync the written files (faster; not durable against a machine crash)")
    g = p.add_argument_group("target layout (default: the source's)")
    g.add_argument("--target-tensor-model-parallel-size", type=_positive_int, default=None)
    g.add_argument("--target-pipeline-model-parallel-size", type=_positive_int, default=None)
    g.add_argument("--target-data-parallel-size", type=_positive_int, default=None)
    g = p.add_argument_group("growth (the grown model computes the same function)")
    g.add_argument("--qkv-num-param-tokens", type=_positive_int, default=None, help="new total per Q/K/V Pattention")
    g.add_argument("--proj-num-param-tokens", type=_positive_int, default=None,
                   help="new total for the attention output Pattention")
    g.add_argument("--ffn-num-param-tokens", type=_positive_int, default=None, help="new total for the FFN Pattention")
    g.add_argument("--param-token-growth-factor", type=float, default=None,
                   help="multiply every token count by this (instead of the three flags above)")
    g.add_argument("--num-layers", type=_positive_int, default=None, help="new number of blocks (>= the source's)")
    g.add_argument("--new-layer-positions", type=_positions, default=None,
                   help="0-based indices of the inserted blocks in the grown model, e.g. 1,3 (default: interleaved)")
    g.add_argument("--new-value-std", type=float, default=None,
                   help="std of new value tokens (default: the model's value init std, 2/(L*sqrt(d)) for 'wang')")
    g.add_argument("--seed", type=int, default=1234, help="seed of the new random values")
    g.add_argument("--reset-optimizer", action="store_true",
                   help="drop the optimizer state (moments, step); training starts it afresh")
    g.add_argument("--reset-iteration", action="store_true",
                   help="start a fresh LR schedule and data pass (iteration 0, no consumed samples)")
    g = p.add_argument_group("width growth of a --model-type transformer checkpoint (Net2Net)")
    g.add_argument("--hidden-size", type=_positive_int, default=None,
                   help="new model width: a multiple k of the checkpoint's (heads x k, every unit copied k times, "
                        "inputs split; the logits stay the same). Resets the optimizer state")
    g.add_argument("--ffn-hidden-size", type=_positive_int, default=None,
                   help="new MLP width (default: k x the checkpoint's)")
    g.add_argument("--net2net-noise-std", type=float, default=0.0,
                   help="noise on the new copies, relative to each matrix's std, to break their symmetry "
                        "(0: exactly function-preserving, but exact copies never diverge)")
    return p


def main(argv=None) -> int:
    return run_tool("expand_checkpoint.py", _main, argv, failures=[((FileNotFoundError, KeyError), 2)])


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    from megatron_tokenformer.checkpointing.expand import ExpandOptions, expand_checkpoint

    expand_checkpoint(ExpandOptions(**vars(args)), log=lambda msg: print(msg, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
