#!/usr/bin/env python
"""Build a text corpus from files already on this machine (no download).

    python tools/build_local_corpus.py --output data/local_corpus.jsonl --max-mb 20

Takes the .py/.txt/.rst/.md files of the Python standard library and installed packages
(sysconfig paths), sorted, one document per file, up to --max-mb megabytes. Writes JSON-lines
({"text": ..., "source": ...}) for a .jsonl/.json output, plain text otherwise.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_tokenformer.cli import run_tool  # noqa: E402
from megatron_tokenformer.data.local_corpus import DEFAULT_EXTENSIONS, build_local_corpus  # noqa: E402


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True)
    p.add_argument("--max-mb", type=float, default=20.0, help="stop before the corpus exceeds this size")
    p.add_argument("--format", default=None, choices=["jsonl", "text"],
                   help="default: jsonl for .jsonl/.json outputs, else text")
    p.add_argument("--roots", nargs="*", default=None,
                   help="folders to collect from (default: stdlib, purelib, platlib)")
    p.add_argument("--extensions", nargs="*", default=list(DEFAULT_EXTENSIONS))
    p.add_argument("--shuffle-seed", type=int, default=None,
                   help="write the chosen files in this seed's random order (default: sorted); a contiguous "
                        "--split of the corpus then samples all of it, not the last packages")
    return p.parse_args(argv)


def main(argv=None) -> int:
    return run_tool("build_local_corpus.py", _main, argv, failures=[((ValueError, OSError), 1)])


def _main(argv) -> int:
    args = get_args(argv)
    res = build_local_corpus(args.output, args.max_mb, args.format, args.roots, args.extensions,
                             shuffle_seed=args.shuffle_seed)
    print(f"wrote {res['documents']} documents, {res['bytes'] / 1e6:.2f} MB -> {res['output']}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
