#!/usr/bin/env python
"""Generate text from a checkpoint (any layout it was saved at), streaming tokens to stdout.

    python tools/generate.py --load CKPT --prompt "Once upon a time" [--prompt-file F] \
        [--max-new-tokens 64 --temperature 0.8 --top-k 50 --top-p 0.95 | --greedy] [--seed 1234]
    torchrun --nproc_per_node 2 tools/generate.py --load CKPT --prompt ...     # tensor parallel 2

One output line per prompt: the prompt, then the generated text as it is produced; generation stops at
the end-of-document token or after --max-new-tokens. Rank 0 prints. ``--ids`` prints token ids instead
of text (tests). Keys/values of attention are cached (``--no-kv-cache`` recomputes the prefix).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_tokenformer.cli import OneLineParser, run_tool  # noqa: E402


def get_args(argv=None):
    p = OneLineParser(prog="generate.py", description=__doc__)
    p.add_argument("--load", required=True)
    p.add_argument("--iteration", type=int, default=None)
    p.add_argument("--prompt", nargs="*", default=[], help="one or more prompts")
    p.add_argument("--prompt-file", default=None, help="one prompt per non-empty line")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--greedy", action="store_true", help="argmax decoding")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the whole prefix every step")
    p.add_argument("--ids", action="store_true", help="print the generated token ids (space separated)")
    p.add_argument("--tokenizer-model", default=None, help="tokenizer to use instead of the checkpoint's")
    return p.parse_args(argv)


def main(argv=None) -> int:
    rank = int(os.environ.get("RANK", "0"))  # rank 0 alone prints (every rank of a TP run holds the same error)
    return run_tool("generate.py", _main, argv, failures=[((ValueError, FileNotFoundError, OSError), 2)],
                    quiet=rank != 0)


def _main(argv) -> int:
    args = get_args(argv)
    import torch

    from megatron_tokenformer import parallel_state
    from megatron_tokenformer.interop.generation import (
        SamplingOptions,
        generate_tokens,
        iter_prompts,
        load_model_for_inference,
    )

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    out = sys.stdout if rank == 0 else open(os.devnull, "w")
    try:
        opts = SamplingOptions(args.max_new_tokens, args.greedy, args.temperature, args.top_k, args.top_p,
                               args.seed, not args.no_kv_cache).check()
        prompts = list(iter_prompts(args.prompt, args.prompt_file))
        if not prompts:
            raise ValueError("give --prompt TEXT... or --prompt-file F")
        if world > 1:
            torch.distributed.init_process_group("gloo")
            parallel_state.initialize_model_parallel(world, 1)
        model, config, step_dir = load_model_for_inference(args.load, args.iteration)
        from megatron_tokenformer.evaluation import checkpoint_tokenizer
        tokenizer = checkpoint_tokenizer(step_dir, args.tokenizer_model)
        for text in prompts:
            ids = tokenizer.tokenize(text)
            new = []
            if args.ids:
                new = generate_tokens(model, ids, opts, tokenizer.eod)
                print(" ".join(str(i) for i in new), file=out, flush=True)
                continue
            print(text, end="", file=out, flush=True)
            shown = [""]

            def stream(token):  # print the text the new token adds (byte-level merges resolved)
                new.append(token)
                now = tokenizer.detokenize(ids + new)[len(tokenizer.detokenize(ids)):]
                if now.startswith(shown[0]):
                    print(now[len(shown[0]):], end="", file=out, flush=True)
                    shown[0] = now

            generate_tokens(model, ids, opts, tokenizer.eod, on_token=stream)
            print(file=out, flush=True)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
