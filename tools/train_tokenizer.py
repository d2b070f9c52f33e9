#!/usr/bin/env python
"""Train a sentencepiece tokenizer (BPE by default) or a Hugging Face byte-level BPE.

    python tools/train_tokenizer.py --input corpus.jsonl --output-prefix tok --vocab-size 32000
    python tools/train_tokenizer.py --tokenizer-type HFTokenizer --input corpus.jsonl \
        --output-prefix tok --vocab-size 32000

The first writes ``tok.model`` and ``tok.vocab`` (sentencepiece); the second ``tok.json``, a GPT-NeoX
style byte-level BPE ``tokenizer.json`` (ids 0, 1 = ``<|endoftext|>`` (end of document),
``<|padding|>``) for ``--tokenizer-type HFTokenizer --vocab-file tok.json``. Byte fallback is on; ids 0-3 are
``<unk> <s> </s> <pad>``; ``</s>`` is the end-of-document token. Input is streamed
(plain text, JSON-lines, folders); ``--input-sentence-size N`` trains on a random sample
of N lines of a very large corpus.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_tokenformer.cli import run_tool  # noqa: E402
from megatron_tokenformer.data.text_inputs import BadInputError, input_paths, iter_documents  # noqa: E402
from megatron_tokenformer.data.tokenizer import train_sentencepiece  # noqa: E402
from megatron_tokenformer.fileio import OverlapError, check_outputs_apart  # noqa: E402


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, nargs="+", help="files, folders or glob patterns")
    p.add_argument("--input-format", default="auto", choices=["auto", "jsonl", "text"])
    p.add_argument("--json-keys", nargs="+", default=["text"])
    p.add_argument("--skip-bad-lines", action="store_true")
    p.add_argument("--tokenizer-type", default="SentencePieceTokenizer",
                   choices=["SentencePieceTokenizer", "HFTokenizer"],
                   help="HFTokenizer: a byte-level BPE tokenizer.json (Hugging Face tokenizers)")
    p.add_argument("--output-prefix", required=True,
                   help="writes OUTPUT_PREFIX.model and .vocab (sentencepiece) or OUTPUT_PREFIX.json (HFTokenizer)")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    p.add_argument("--input-sentence-size", type=int, default=0,
                   help="train on a random sample of this many lines (0: all lines)")
    p.add_argument("--character-coverage", type=float, default=1.0)
    p.add_argument("--normalization-rule-name", default="identity",
                   choices=["identity", "nmt_nfkc", "nfkc", "nmt_nfkc_cf", "nfkc_cf"],
                   help="identity keeps detokenize(tokenize(x)) == x")
    p.add_argument("--remove-extra-whitespaces", action="store_true")
    p.add_argument("--user-defined-symbols", nargs="*", default=[])
    p.add_argument("--max-sentence-length", type=int, default=16384,
                   help="longer lines (in bytes) are skipped by the trainer")
    p.add_argument("--num-threads", type=int, default=None)
    return p.parse_args(argv)


def _lines(args, counter):
    for doc in iter_documents(args.input, args.input_format, "blank-line", args.json_keys,
                              args.skip_bad_lines, report=counter):
        for line in doc.split("\n"):
            if line.strip():
                counter["lines"] += 1
                yield line


def main(argv=None) -> int:
    return run_tool("train_tokenizer.py", _main, argv,
                    failures=[(OverlapError, 2), ((ValueError, OSError, RuntimeError), 1)])


def _main(argv) -> int:
    args = get_args(argv)
    counter = {"lines": 0}
    outputs = [args.output_prefix + ".json"] if args.tokenizer_type == "HFTokenizer" else \
        [args.output_prefix + ".model", args.output_prefix + ".vocab"]
    # never write where it reads, whatever exists already
    check_outputs_apart([("--output-prefix", p) for p in outputs], [("--input", p) for p in input_paths(args.input)])
    if args.vocab_size < 8:
        raise ValueError(f"--vocab-size {args.vocab_size} is too small")
    lines = _lines(args, counter)
    # Look at the first line now so a bad --input fails before sentencepiece starts.
    try:
        first = next(lines)
    except StopIteration:
        raise BadInputError(f"empty input: no text in --input {' '.join(args.input)}") from None
    if args.tokenizer_type == "HFTokenizer":
        from megatron_tokenformer.data.hf_tokenizer import train_byte_level_bpe
        out = train_byte_level_bpe(_chain(first, lines), args.output_prefix + ".json", args.vocab_size)
        print(f"wrote {out} from {counter['lines']} lines ({len(counter.get('bad_lines', []))} bad lines "
              "skipped)", file=sys.stderr)
        return 0
    tmp_prefix = f"{args.output_prefix}.tmp-{os.getpid()}"
    try:
        train_sentencepiece(
            _chain(first, lines),
            tmp_prefix,
            args.vocab_size,
            model_type=args.model_type,
            input_sentence_size=args.input_sentence_size,
            character_coverage=args.character_coverage,
            normalization_rule_name=args.normalization_rule_name,
            remove_extra_whitespaces=args.remove_extra_whitespaces,
            user_defined_symbols=args.user_defined_symbols,
            max_sentence_length=args.max_sentence_length,
            num_threads=args.num_threads,
        )
        # .model last: a .model that exists is complete
        os.replace(tmp_prefix + ".vocab", args.output_prefix + ".vocab")
        os.replace(tmp_prefix + ".model", args.output_prefix + ".model")
    finally:
        for suffix in (".model", ".vocab"):
            if os.path.exists(tmp_prefix + suffix):
                os.remove(tmp_prefix + suffix)
    model = args.output_prefix + ".model"
    print(f"wrote {model} and {args.output_prefix}.vocab from {counter['lines']} lines "
          f"({len(counter.get('bad_lines', []))} bad lines skipped)", file=sys.stderr)
    return 0


def _chain(first, rest):
    yield first
    yield from rest


if __name__ == "__main__":
    sys.exit(main())
