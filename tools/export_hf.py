#!/usr/bin/env python
"""Export a checkpoint (any TP/PP/DP layout; tokenformer or transformer) to a Hugging Face folder.

    python tools/export_hf.py --load CKPT [--iteration N] --save HF_DIR [--dtype float32|bfloat16|float16]

Then, with nothing of this project installed (only torch + transformers):

    AutoModelForCausalLM.from_pretrained(HF_DIR, trust_remote_code=True); AutoTokenizer.from_pretrained(HF_DIR)

See docs/interop.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_tokenformer.cli import OneLineParser, run_tool  # noqa: E402


def get_args(argv=None):
    p = OneLineParser(prog="export_hf.py", description=__doc__)
    p.add_argument("--load", required=True, help="checkpoint directory (any layout)")
    p.add_argument("--iteration", type=int, default=None, help="step to export (default: `latest`)")
    p.add_argument("--save", required=True, help="the Hugging Face folder to write")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-shard-size", default="5GB", help="split model.safetensors above this size (e.g. 2GB)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --save folder")
    return p.parse_args(argv)


def main(argv=None) -> int:
    return run_tool("export_hf.py", _main, argv,
                    failures=[((ValueError, FileNotFoundError, FileExistsError, ImportError), 2)])


def _main(argv) -> int:
    args = get_args(argv)
    from megatron_tokenformer.interop.hf_export import export_hf
    export_hf(args.load, args.save, args.iteration, args.dtype, args.max_shard_size, args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
