#!/usr/bin/env python
"""Check every file of a checkpoint folder without loading it: structure, allowed pickle globals, checksums.

    python tools/verify_checkpoint.py --load CKPT                 # every complete step folder of CKPT
    python tools/verify_checkpoint.py --load CKPT --iteration 1000
    python tools/verify_checkpoint.py --load CKPT/global_step1000  # one step folder

One line per step folder ("ok (...)" or "BAD: <the file and what is wrong>"); exit 0 when every step is
good, 1 when any is not, 2 on a usage error. Nothing in the folder is changed and nothing in it runs.
The checks are those every load runs first (megatron_tokenformer/checkpointing/file_checks.py;
docs/checkpoints.md, "Integrity and trust").
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_tokenformer.cli import OneLineParser, run_tool  # noqa: E402


def get_args(argv=None):
    p = OneLineParser(prog="verify_checkpoint.py", description=__doc__)
    p.add_argument("--load", required=True, help="checkpoint directory, or one step folder")
    p.add_argument("--iteration", type=int, default=None, help="only this step (default: every complete step)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    return run_tool("verify_checkpoint.py", _main, argv, failures=[((ValueError, FileNotFoundError), 2)])


def _main(argv) -> int:
    args = get_args(argv)
    from megatron_tokenformer.checkpointing.file_checks import verify_folder
    problems = verify_folder(args.load, args.iteration, log=lambda line: print(line, flush=True))
    if problems:
        print(f"verify_checkpoint.py: {len(problems)} bad step folder(s) in {args.load}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
