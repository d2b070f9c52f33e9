#!/usr/bin/env python
"""Concatenate indexed datasets (.bin/.idx pairs) into one.

    python tools/merge_datasets.py --input data/a_text_document data/b_text_document \
        --output-prefix data/all_text_document
    python tools/merge_datasets.py --input data/shards/ --output-prefix data/all_text_document

``--input`` takes path prefixes (without .bin/.idx) or folders (every pair inside, in
sorted order). Documents keep their order; the widest input dtype is used for the output.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_tokenformer.cli import run_tool  # noqa: E402
from megatron_tokenformer.data.indexed_dataset import (  # noqa: E402
    IndexedDatasetError,
    data_file_path,
    dataset_exists,
    index_file_path,
    merge_datasets,
)
from megatron_tokenformer.fileio import OverlapError, check_outputs_apart  # noqa: E402


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, nargs="+",
                   help="dataset prefixes, or folders holding .bin/.idx pairs")
    p.add_argument("--output-prefix", required=True, help="writes OUTPUT_PREFIX.bin/.idx")
    return p.parse_args(argv)


def resolve_inputs(inputs):
    prefixes = []
    for spec in inputs:
        if os.path.isdir(spec):
            found = sorted(
                os.path.join(spec, n[:-4]) for n in os.listdir(spec)
                if n.endswith(".idx") and os.path.isfile(os.path.join(spec, n[:-4] + ".bin"))
            )
            if not found:
                raise IndexedDatasetError(f"--input {spec}: folder holds no .bin/.idx pair")
            prefixes.extend(found)
        else:
            for suffix in (".bin", ".idx"):
                if spec.endswith(suffix) and dataset_exists(spec[: -len(suffix)]):
                    spec = spec[: -len(suffix)]
            if not dataset_exists(spec):
                raise IndexedDatasetError(f"--input {spec}: no {spec}.bin/{spec}.idx pair")
            prefixes.append(spec)
    return prefixes


def main(argv=None) -> int:
    return run_tool("merge_datasets.py", _main, argv, failures=[(OverlapError, 2), ((ValueError, OSError), 1)])


def _main(argv) -> int:
    args = get_args(argv)
    outputs = [("--output-prefix", f(args.output_prefix)) for f in (data_file_path, index_file_path)]
    # never write where it reads (a folder --input included), with or without an existing output
    check_outputs_apart(outputs, [("--input", spec) for spec in args.input if os.path.isdir(spec)])
    prefixes = resolve_inputs(args.input)
    check_outputs_apart(outputs, [("--input", f(p)) for p in prefixes for f in (data_file_path, index_file_path)])
    out = merge_datasets(prefixes, args.output_prefix)
    print(f"merged {len(prefixes)} datasets -> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
