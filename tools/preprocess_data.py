#!/usr/bin/env python
"""Tokenize raw text into a Megatron-LM compatible indexed dataset (.bin/.idx).

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model \
        --append-eod --workers 2

writes ``data/corpus_text_document.bin`` and ``.idx`` (one pair per ``--json-keys`` key).
Plain text: a document is a block of non-blank lines (``--document-boundary blank-line``,
the default) or a whole file (``--document-boundary file``). See docs/data.md.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_tokenformer.cli import ToolError, run_tool  # noqa: E402
from megatron_tokenformer.data.hf_tokenizer import resolve_hf_tokenizer_file  # noqa: E402
from megatron_tokenformer.data.preprocess import check_preprocess_outputs_apart, existing_outputs, preprocess  # noqa: E402,E501
from megatron_tokenformer.data.tokenizer import HF_TOKENIZER_TYPES, TOKENIZER_TYPES  # noqa: E402
from megatron_tokenformer.fileio import OverlapError  # noqa: E402


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input data")
    g.add_argument("--input", required=True, nargs="+",
                   help="input files, folders (searched recursively) or glob patterns")
    g.add_argument("--input-format", default="auto", choices=["auto", "jsonl", "text"],
                   help="auto: .jsonl/.json/.ndjson are JSON-lines, anything else plain text")
    g.add_argument("--json-keys", nargs="+", default=["text"],
                   help="JSON keys to tokenize, one output dataset per key (plain text uses the first)")
    g.add_argument("--document-boundary", default="blank-line", choices=["blank-line", "file"],
                   help="plain text: a document is a blank-line separated block, or a whole file")
    g.add_argument("--skip-bad-lines", action="store_true",
                   help="drop undecodable / malformed lines and report them instead of failing")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", default="SentencePieceTokenizer", choices=list(TOKENIZER_TYPES))
    g.add_argument("--tokenizer-model", default=None,
                   help="sentencepiece .model file; HuggingFaceTokenizer: tokenizer.json or a folder holding one")
    g.add_argument("--vocab-file", default=None, help="HFTokenizer (GPT-NeoX's name): a tokenizer.json")
    g.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer only")
    g.add_argument("--append-eod", action="store_true", help="end every document with the eod token")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True,
                   help="writes OUTPUT_PREFIX_{key}_document.bin/.idx")
    g.add_argument("--dataset-impl", default="mmap", choices=["mmap"], help="only mmap (MMIDIDX)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace existing OUTPUT_PREFIX_{key}_document.bin/.idx (refused without it)")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    g.add_argument("--log-interval", type=int, default=10000, help="documents between progress lines")
    g.add_argument("--chunk-mb", type=float, default=1.0, help="bytes of input per task sent to a worker")
    return p.parse_args(argv)


def main(argv=None) -> int:
    return run_tool("preprocess_data.py", _main, argv,
                    failures=[(OverlapError, 2), ((ValueError, OSError), 1)])


def _main(argv) -> int:
    args = get_args(argv)
    # never write where it reads, with --overwrite or without
    check_preprocess_outputs_apart(args.input, args.output_prefix, args.json_keys,
                                   args.tokenizer_model or args.vocab_file)
    existing = existing_outputs(args.output_prefix, args.json_keys)
    if existing and not args.overwrite:
        raise ToolError(f"--output-prefix {args.output_prefix} already holds a dataset ({', '.join(existing)}); "
                        "pass --overwrite to replace it, or choose another prefix")
    if args.tokenizer_type in HF_TOKENIZER_TYPES:
        args.tokenizer_model = resolve_hf_tokenizer_file(args.tokenizer_type, args.tokenizer_model, args.vocab_file)
    preprocess(
        inputs=args.input,
        output_prefix=args.output_prefix,
        tokenizer_type=args.tokenizer_type,
        tokenizer_model=args.tokenizer_model,
        vocab_size=args.vocab_size,
        json_keys=args.json_keys,
        append_eod=args.append_eod,
        workers=args.workers,
        log_interval=args.log_interval,
        input_format=args.input_format,
        document_boundary=args.document_boundary,
        skip_bad_lines=args.skip_bad_lines,
        chunk_bytes=max(1, int(args.chunk_mb * (1 << 20))),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
