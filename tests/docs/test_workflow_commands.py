"""docs/workflow.md: every ```bash block, in order, as one script, scaled down through its variables.

The page's settings block reads every variable from the environment first, so this test sets tiny
values (a generated text, a 512-token tokenizer, a 4-layer d = 32 model, 2 ranks, a few iterations)
and runs the page's own commands unchanged. Then it checks what the page promises: the grown
checkpoint has GROWTH x the tokens, the grown model evaluates to the small model's loss (same
function), the continued run resumed at ITERS at the new layout, and every evaluation printed a loss.
"""

import json
import os
import random
import re
import subprocess
import sys

import pytest

from tests.helpers import zygote  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAGE = os.path.join(ROOT, "docs", "workflow.md")


def bash_blocks(path):
    with open(path) as f:
        return re.findall(r"^```bash\n(.*?)^```", f.read(), flags=re.S | re.M)


def write_text(path):
    rng = random.Random(1)
    syllables = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "ve", "da", "xi", "gu", "be", "fo", "ha", "ju"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(300)]
    with open(path, "w") as f:
        for _ in range(500):
            for _ in range(rng.randint(2, 6)):
                a, b, c = rng.choice(words), rng.choice(words), rng.choice(words)
                f.write(f"the {a} sees the {b}, and the {b} {c} {rng.randint(1, 99)} {a}s.\n")
            f.write("\n")


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("workflow")
    text = tmp / "corpus.txt"
    write_text(text)
    blocks = bash_blocks(PAGE)
    assert len(blocks) == 8, "settings, tokenizer, preprocess, pretrain, grow, reshard, continue, evaluate"
    script = "set -euo pipefail\n" + "\n".join(blocks)
    env = zygote.shim_env(dict(
        os.environ,
        PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],  # torchrun of this interpreter
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        WORK=str(tmp / "work"), TEXT=str(text), VOCAB="512", WORKERS="2", NPROC="2", TP="2", SPLIT="90,5,5",
        GROWTH="2", ITERS="4", MORE_ITERS="2",
        MODEL_ARGS="--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 32 "
                   "--qkv-num-param-tokens 16 --proj-num-param-tokens 16 --ffn-num-param-tokens 64",
        TRAIN_ARGS="--micro-batch-size 2 --global-batch-size 4 --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine "
                   "--lr-warmup-iters 1 --weight-decay 0.1 --adam-beta2 0.95 --clip-grad 1.0",
        LOG_ARGS="--log-interval 1 --eval-interval 2 --eval-iters 1 --save-interval 2",
    ))  # the page's python/torchrun runs forked by this worker's fork server (tests/helpers/zygote.py)
    proc = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + "\n" + proc.stderr[-4000:]
    return tmp / "work", proc


def read_meta(step_dir):
    with open(os.path.join(step_dir, "tokenformer_checkpoint.json")) as f:
        return json.load(f)


def test_every_step_ran_and_wrote_its_output(workflow):
    work, proc = workflow
    assert (work / "tok.model").is_file()
    assert (work / "corpus_text_document.bin").is_file() and (work / "corpus_text_document.idx").is_file()
    small = read_meta(work / "ckpt" / "small" / "global_step4")
    assert small["layout"]["tensor_model_parallel_size"] == 2 and small["iteration"] == 4
    grown = read_meta(work / "ckpt" / "grown" / "global_step4")["model_config"]
    assert (grown["qkv_num_param_tokens"], grown["proj_num_param_tokens"], grown["ffn_num_param_tokens"]) == \
        (32, 32, 128)
    assert grown["qkv_tau"] == pytest.approx(4.0) and grown["ffn_tau"] == pytest.approx(8.0)  # sqrt of the OLD counts
    assert read_meta(work / "ckpt" / "grown_tp1" / "global_step4")["layout"]["tensor_model_parallel_size"] == 1
    trained = read_meta(work / "ckpt" / "grown_trained" / "global_step6")
    assert trained["iteration"] == 6 and trained["layout"]["data_parallel_size"] == 2
    assert "dry run: nothing written" in proc.stdout
    assert "training from iteration 4 to 6" in proc.stdout


def test_evaluations_show_growth_preserved_the_function(workflow):
    work, proc = workflow
    results = {name: json.load(open(work / f"eval_{name}.json")) for name in ("small", "grown", "grown_trained")}
    assert len(re.findall(r" evaluation \| lm loss value: ", proc.stdout)) == 3
    small, grown, trained = results["small"], results["grown"], results["grown_trained"]
    assert small["tokens"] == grown["tokens"] == trained["tokens"] > 0
    assert abs(small["loss"] - grown["loss"]) <= 1e-5 * small["loss"]
    assert grown["parameters"] > small["parameters"]
    assert trained["loss"] != grown["loss"]
