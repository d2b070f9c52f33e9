#!/usr/bin/env python
"""Import a model into a checkpoint of this system (canonical; loads at any TP/PP/DP layout).

    # an official TokenFormer checkpoint (GPT-NeoX code): released pytorch_model.bin or a DeepSpeed folder
    python tools/import_checkpoint.py --format tokenformer-official --input TokenFormer-150M/pytorch_model.bin \
        --config 150M_eval.yml --save ckpt_150m [--tokenizer-type HFTokenizer --vocab-file 20B_tokenizer.json]

    # a Hugging Face folder written by tools/export_hf.py (round trip)
    python tools/import_checkpoint.py --format hf --input HF_DIR --save ckpt

Then ``pretrain_tokenformer.py --load ckpt`` continues training (iteration 0, fresh optimizer),
``tools/evaluate_checkpoint.py --load ckpt`` evaluates, ``tools/expand_checkpoint.py`` grows/reshards.
Bad input: one line naming the flag, field, file or key; exit 2; nothing written. See docs/interop.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_tokenformer.cli import OneLineParser, ToolError, run_tool  # noqa: E402


def get_args(argv=None):
    p = OneLineParser(prog="import_checkpoint.py", description=__doc__)
    p.add_argument("--format", required=True, choices=["tokenformer-official", "hf"])
    p.add_argument("--input", required=True, help="pytorch_model.bin / official DeepSpeed folder / HF folder")
    p.add_argument("--config", default=None, help="tokenformer-official: the official NeoX YAML (or JSON) config")
    p.add_argument("--save", required=True, help="checkpoint directory to write (must not exist or be empty)")
    p.add_argument("--tokenizer-type", default=None, choices=["HFTokenizer", "HuggingFaceTokenizer",
                                                              "SentencePieceTokenizer"],
                   help="tokenformer-official: the tokenizer (vocabulary = its size; without one every padded "
                        "embedding row is vocabulary)")
    p.add_argument("--vocab-file", default=None, help="HFTokenizer: tokenizer.json (GPT-NeoX-20B's for the releases)")
    p.add_argument("--tokenizer-model", default=None, help="HuggingFaceTokenizer / SentencePieceTokenizer model")
    p.add_argument("--target-tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--target-pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--target-data-parallel-size", type=int, default=1)
    return p.parse_args(argv)


def main(argv=None) -> int:
    return run_tool("import_checkpoint.py", _main, argv,
                    failures=[((ValueError, FileNotFoundError, FileExistsError, ImportError, OSError), 2)])


def _main(argv) -> int:
    args = get_args(argv)
    for flag, value in (("--target-tensor-model-parallel-size", args.target_tensor_model_parallel_size),
                        ("--target-pipeline-model-parallel-size", args.target_pipeline_model_parallel_size),
                        ("--target-data-parallel-size", args.target_data_parallel_size)):
        if value < 1:
            raise ToolError(f"{flag} must be >= 1, got {value}")
    layout = {"tensor_model_parallel_size": args.target_tensor_model_parallel_size,
              "pipeline_model_parallel_size": args.target_pipeline_model_parallel_size,
              "data_parallel_size": args.target_data_parallel_size}
    if args.format == "tokenformer-official":
        if args.config is None:
            raise ToolError("--format tokenformer-official needs --config (the official NeoX YAML)")
        if args.tokenizer_type is None and (args.vocab_file or args.tokenizer_model):
            args.tokenizer_type = "HFTokenizer" if args.vocab_file else "HuggingFaceTokenizer"
        from megatron_tokenformer.interop.official import import_official
        import_official(args.input, args.config, args.save, args.tokenizer_type, args.vocab_file,
                        args.tokenizer_model, layout)
    else:
        from megatron_tokenformer.interop.hf_import import import_hf
        import_hf(args.input, args.save, layout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
