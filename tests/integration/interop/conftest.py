"""Shared, lazily built fixtures of the interop tests (each built once per session):

* ``hf_assets``: a byte-level BPE ``tokenizer.json`` trained here, a JSON-lines corpus and its
  ``.bin/.idx`` dataset made with it;
* ``trained``: tiny checkpoints of both model types at (TP, PP, DP) = (1, 1, 1) and (2, 2, 1), trained
  for 2 iterations on that dataset with the HF tokenizer (the four runs start together);
* ``random_ckpt``: a canonical checkpoint of a tiny Tokenformer with large random weights (diverse
  greedy continuations for the generation tests; no training needed).
"""

import json
import os
import random
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from tests.helpers import ckpt_runs, train_runs  # noqa: E402
from tests.helpers.paths import REPO_ROOT, load_tool  # noqa: E402

WORDS = ("the cat sat on a mat and the dog ran to the park while birds sang in tall green trees "
         "every morning people walk along quiet streets").split()
ARCH = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--qkv-num-param-tokens", "16", "--proj-num-param-tokens", "16", "--ffn-num-param-tokens", "32"]
LAYOUTS = [("tokenformer", (1, 1, 1)), ("tokenformer", (2, 2, 1)), ("transformer", (1, 1, 1)),
           ("transformer", (2, 2, 1))]


def sentences(seed: int, n: int):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 25))) for _ in range(n)]


@pytest.fixture(scope="session")
def interop_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("interop")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_MODULES_CACHE", str(d / "hf_modules"))
    return d


@pytest.fixture(scope="session")
def hf_assets(interop_dir):
    """{"tokenizer": tokenizer.json, "corpus": .jsonl, "data": dataset prefix}."""
    d = interop_dir / "assets"
    d.mkdir()
    with open(d / "corpus.jsonl", "w") as f:
        for s in sentences(0, 400):
            f.write(json.dumps({"text": s}) + "\n")
    assert load_tool("train_tokenizer").main(["--tokenizer-type", "HFTokenizer", "--input", str(d / "corpus.jsonl"),
                                              "--output-prefix", str(d / "tokenizer"), "--vocab-size", "300"]) == 0
    assert load_tool("preprocess_data").main(["--input", str(d / "corpus.jsonl"), "--output-prefix", str(d / "data"),
                                              "--tokenizer-type", "HFTokenizer", "--vocab-file",
                                              str(d / "tokenizer.json"), "--append-eod"]) == 0
    return {"tokenizer": str(d / "tokenizer.json"), "corpus": str(d / "corpus.jsonl"),
            "data": str(d / "data_text_document")}


def train_args(model_type, save, assets, iters=2):
    extra = ["--model-type", model_type] if model_type != "tokenformer" else []
    return ARCH + extra + ["--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "5e-3",
                           "--lr-warmup-iters", "1", "--train-iters", str(iters), "--data-path", assets["data"],
                           "--tokenizer-type", "HFTokenizer", "--vocab-file", assets["tokenizer"], "--save", save,
                           "--save-interval", str(iters), "--eval-iters", "0", "--log-interval", "1", "--seed", "3"]


@pytest.fixture(scope="session")
def trained(interop_dir, hf_assets):
    """(model_type, layout) -> save dir of a 2-iteration run (all four runs start on first use)."""
    runs = {}
    procs = []
    for model_type, layout in LAYOUTS:
        save = str(interop_dir / f"{model_type}_{''.join(map(str, layout))}")
        cmd = ckpt_runs.command(layout, train_args(model_type, save, hf_assets))
        procs.append((model_type, layout, save, train_runs.start(cmd)))
    for model_type, layout, save, p in procs:
        out = train_runs.finish(p, 900)
        assert out.returncode == 0, out.stdout[-4000:]
        runs[(model_type, layout)] = save
    return runs


@pytest.fixture(scope="session")
def random_ckpt(interop_dir, hf_assets):
    """A canonical checkpoint of a tiny Tokenformer with N(0, 0.3) weights, tokenizer included."""
    import torch

    from megatron_tokenformer.config import TokenformerConfig
    from megatron_tokenformer.data.tokenizer import build_tokenizer
    from megatron_tokenformer.interop.checkpoint_format import write_checkpoint

    tok = build_tokenizer("HFTokenizer", vocab_file=hf_assets["tokenizer"])
    config = TokenformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=64,
                               vocab_size=tok.vocab_size, qkv_num_param_tokens=16, proj_num_param_tokens=16,
                               ffn_num_param_tokens=32).resolve_taus()
    from megatron_tokenformer.interop.checkpoint_format import parameter_layout
    gen = torch.Generator().manual_seed(5)
    tensors = {name: torch.randn(shape, generator=gen) * 0.3
               for name, (shape, _, _) in parameter_layout(config).items()}
    save = str(interop_dir / "random_ckpt")
    write_checkpoint(save, config, tensors, {"tokenizer_type": "HFTokenizer"}, tokenizer_file=hf_assets["tokenizer"])
    return save


def run_tool(name, args, timeout=600, nproc=1):
    """Run tools/<name>.py as a subprocess (torchrun when nproc > 1); returns CompletedProcess (merged output)."""
    script = os.path.join(REPO_ROOT, "tools", name + ".py")
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(train_runs.free_port()), script] + list(args)
    else:
        cmd = [sys.executable, script] + list(args)
    return train_runs.run(cmd, timeout, extra_env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                                                    "TOKENIZERS_PARALLELISM": "false"})
