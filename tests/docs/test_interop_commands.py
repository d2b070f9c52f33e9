"""docs/interop.md: every ```bash block, in order, as one script, scaled down through its variables.

Inputs made here: a tiny TokenFormer in the exact official on-disk form (``pytorch_model.bin`` with
``sequential.<i>`` keys and padded vocabulary, plus a NeoX YAML config), a byte-level BPE
``tokenizer.json``, a text corpus, and an lm-eval task of our own (a task YAML over a local JSON-lines
file), all offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE). Then the page's commands run unchanged:
import -> evaluate -> grow x2 + reshard to TP 2 -> continue training at TP 2 -> export -> lm_eval ->
generate. Checked: the grown model evaluates to the imported model's loss, the continued run trained
at TP 2, and lm_eval's accuracy (and every per-choice log-likelihood) equals the same quantity
computed directly from our model.
"""

import glob
import json
import os
import random
import re
import subprocess
import sys

import pytest
import torch

from tests.helpers import zygote  # noqa: E402

pytest.importorskip("transformers")
pytest.importorskip("lm_eval")

from tests.unit.interop.test_official import official_state_dict, write_config  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAGE = os.path.join(ROOT, "docs", "interop.md")
WORDS = "the cat sat on a mat and the dog ran to the park while birds sang in tall green trees".split()

TASK_YAML = """task: tinytask
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def bash_blocks(path):
    with open(path) as f:
        return re.findall(r"^```bash\n(.*?)^```", f.read(), flags=re.S | re.M)


@pytest.fixture(scope="module")
def interop_workflow(tmp_path_factory):
    from megatron_tokenformer.data.hf_tokenizer import train_byte_level_bpe

    tmp = tmp_path_factory.mktemp("interop_docs")
    rng = random.Random(4)
    text = tmp / "corpus.jsonl"
    with open(text, "w") as f:
        for _ in range(200):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30)))}) + "\n")
    train_byte_level_bpe(iter([" ".join(rng.choice(WORDS) for _ in range(20)) for _ in range(200)]),
                         str(tmp / "tokenizer.json"), 300)
    torch.save(official_state_dict(7), tmp / "pytorch_model.bin")
    config = write_config(tmp, "l2_norm_gelu", seq_length=64, max_position_embeddings=64)
    docs = [{"context": " ".join(rng.choice(WORDS) for _ in range(6)), "choices": rng.sample(WORDS, 3),
             "label": rng.randrange(3)} for _ in range(10)]
    task_dir = tmp / "tasks"
    task_dir.mkdir()
    with open(task_dir / "tinytask.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
    (task_dir / "tinytask.yaml").write_text(TASK_YAML.format(data=task_dir / "tinytask.jsonl"))
    blocks = bash_blocks(PAGE)
    assert len(blocks) == 7, "settings, import, evaluate, grow, continue, export, lm_eval + generate"
    script = "set -euo pipefail\n" + "\n".join(blocks)
    env = zygote.shim_env(dict(
        os.environ,
        PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
        HF_MODULES_CACHE=str(tmp / "hf_modules"), HF_DATASETS_CACHE=str(tmp / "hf_datasets"),
        WORK=str(tmp / "work"), OFFICIAL=str(tmp / "pytorch_model.bin"), OFFICIAL_CONFIG=config,
        VOCAB_FILE=str(tmp / "tokenizer.json"), TEXT=str(text), NPROC="2", TP="2", GROWTH="2", ITERS="2",
        TRAIN_ARGS="--micro-batch-size 2 --global-batch-size 4 --lr 1e-3 --lr-warmup-iters 1 --log-interval 1",
        TASKS="tinytask", LM_EVAL_ARGS=f"--device cpu --batch_size 4 --log_samples --include_path {task_dir}",
        PROMPT="the cat sat on",
    ))  # the page's python/torchrun runs forked by this worker's fork server (tests/helpers/zygote.py)
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    proc = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + "\n" + proc.stderr[-4000:]
    return tmp / "work", proc, docs


def test_grown_model_evaluates_to_the_imported_loss(interop_workflow):
    _, proc, _ = interop_workflow
    losses = [float(x) for x in re.findall(r"lm loss value: ([0-9.E+-]+)", proc.stdout)]
    assert len(losses) == 2
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_continued_at_tp2_and_exported(interop_workflow):
    work, proc, _ = interop_workflow
    meta = json.load(open(work / "continued" / "global_step2" / "tokenformer_checkpoint.json"))
    assert meta["layout"]["tensor_model_parallel_size"] == 2 and meta["iteration"] == 2
    assert meta["model_config"]["qkv_num_param_tokens"] == 32  # grown x2 from the official 16
    assert (work / "hf" / "model.safetensors").is_file()
    assert proc.stdout.rstrip().splitlines()[-1].startswith("the cat sat on")  # generate.py's streamed line


def test_lm_eval_accuracy_equals_our_log_likelihoods(interop_workflow):
    from megatron_tokenformer.evaluation import checkpoint_tokenizer, load_model

    work, _, docs = interop_workflow
    results = glob.glob(str(work / "lm_eval" / "**" / "results_*.json"), recursive=True)
    assert len(results) == 1
    reported = json.load(open(results[0]))["results"]["tinytask"]["acc,none"]
    model, config, step_dir = load_model(str(work / "continued"))
    tok = checkpoint_tokenizer(step_dir)
    correct, lls = 0, []
    for doc in docs:
        scores = []
        for choice in doc["choices"]:
            context, continuation = doc["context"], " " + choice  # lm-eval: target_delimiter " "
            whole, ctx = tok.tokenize(context + continuation), tok.tokenize(context)
            cont = whole[len(ctx):]
            with torch.no_grad():
                logits = model(torch.tensor([whole[:-1]]))[0, :, : config.vocab_size].float()
            logp = torch.log_softmax(logits, dim=-1)[len(ctx) - 1:]
            scores.append(float(logp[torch.arange(len(cont)), torch.tensor(cont)].sum()))
        lls.append(scores)
        correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
    assert reported == pytest.approx(correct / len(docs), abs=1e-9)
    samples = glob.glob(str(work / "lm_eval" / "**" / "samples_tinytask_*.jsonl"), recursive=True)
    if samples:  # per-choice log-likelihoods, when lm-eval logged them
        rows = sorted((json.loads(line) for line in open(samples[0])), key=lambda r: r["doc_id"])
        for row, ours in zip(rows, lls):
            theirs = [float(r[0]) for r in row["filtered_resps"]]
            assert theirs == pytest.approx(ours, rel=1e-4, abs=1e-4)
