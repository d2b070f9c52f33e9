#!/usr/bin/env python
"""Loss and perplexity of a checkpoint on held-out data, in one process (no GPU, no process group).

    # the test split of a preprocessed dataset (the same --split as training)
    python tools/evaluate_checkpoint.py --load ckpt --data-path data/corpus_text_document --split 969,30,1
    # raw text, tokenized with the tokenizer stored in the checkpoint
    python tools/evaluate_checkpoint.py --load ckpt --text held_out.txt

Reads any checkpoint pretrain_tokenformer.py or tools/expand_checkpoint.py wrote (any TP/PP/DP layout)
into a TP = 1 model; see megatron_tokenformer/evaluation.py for exactly what is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_tokenformer.cli import ToolError, run_tool  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate_checkpoint.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--load", required=True, help="checkpoint directory")
    p.add_argument("--iteration", type=int, default=None, help="step to evaluate (default: the one `latest` names)")
    g = p.add_argument_group("data (one of)")
    g.add_argument("--data-path", default=None, help="dataset prefix written by tools/preprocess_data.py")
    g.add_argument("--text", nargs="+", default=None, help="raw text / JSON-lines files (documents as for "
                                                           "tools/preprocess_data.py)")
    p.add_argument("--split", default="969,30,1", help="with --data-path: train,valid,test proportions")
    p.add_argument("--eval-split", default="test", choices=["train", "valid", "test"])
    p.add_argument("--tokenizer-model", default=None,
                   help="with --text: SentencePiece model (default: the one stored in the checkpoint)")
    p.add_argument("--seq-length", type=int, default=None, help="window length (default: the model's seq_length)")
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--max-samples", type=int, default=None, help="evaluate at most this many windows")
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    return p


def main(argv=None) -> int:
    return run_tool("evaluate_checkpoint.py", _main, argv, failures=[((FileNotFoundError, ValueError), 2)])


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    from megatron_tokenformer.evaluation import evaluate_checkpoint

    if args.micro_batch_size < 1:
        raise ToolError("--micro-batch-size must be >= 1")
    result, info = evaluate_checkpoint(args.load, args.iteration, args.data_path, args.split, args.eval_split,
                                       args.text, args.tokenizer_model, args.seq_length, args.micro_batch_size,
                                       args.max_samples)
    print(f"evaluated {info['step_dir']} ({info['model_type']}, {info['parameters']:,} parameters) on "
          f"{info['source']}: {result.samples} windows of {info['seq_length']} tokens, "
          f"{result.tokens} predicted tokens")
    print(f" evaluation | lm loss value: {result.loss:.6E} | lm loss PPL: {result.perplexity:.6E} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(vars(result), **info), f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
