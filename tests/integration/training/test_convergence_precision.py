"""Training on real text lowers the loss (100 iterations, with evaluation lines and TensorBoard), and the
bf16 and fp16 (dynamic loss scaling) paths finish without NaN and stay close to fp32."""

import math
import random

import pytest

from tests.helpers import train_runs

pytestmark = pytest.mark.slow


def _write_text(path, n_sentences=3000, seed=0):
    """English-like text from a small grammar: learnable structure, a real tokenizer's job to split."""
    rng = random.Random(seed)
    subjects = ["the cat", "a dog", "my neighbour", "the old sailor", "our teacher", "the small bird", "a farmer",
                "the queen", "every child", "the engineer"]
    verbs = ["watches", "finds", "carries", "paints", "remembers", "follows", "builds", "sells", "likes", "hears"]
    objects = ["the red boat", "a wooden chair", "the river", "a long letter", "the garden", "an apple",
               "the morning train", "a quiet song", "the northern hills", "a silver key"]
    tails = ["in the evening", "after the rain", "with great care", "near the old bridge", "every Sunday",
             "before dinner", "without a word", "at the market"]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n_sentences):
            sentence = f"{rng.choice(subjects).capitalize()} {rng.choice(verbs)} {rng.choice(objects)}"
            if rng.random() < 0.6:
                sentence += " " + rng.choice(tails)
            f.write(sentence + ".\n")
            if i % 8 == 7:
                f.write("\n")  # blank line: end of a document


@pytest.fixture(scope="module")
def text_dataset(tmp_path_factory):
    from megatron_tokenformer.data.preprocess import preprocess
    from megatron_tokenformer.data.tokenizer import train_sentencepiece

    work = tmp_path_factory.mktemp("text")
    text = work / "stories.txt"
    _write_text(str(text))
    lines = [line for line in text.read_text().splitlines() if line]
    model = train_sentencepiece(iter(lines), str(work / "tok"), vocab_size=300, num_threads=1)
    preprocess([str(text)], str(work / "stories"), tokenizer_model=model, append_eod=True, workers=1,
               log=lambda _msg: None)
    return str(work / "stories_text_document"), model


def test_loss_goes_down_on_real_text(text_dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    prefix, model = text_dataset
    tb = tmp_path / "tb"
    args = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
            "--qkv-num-param-tokens", "64", "--proj-num-param-tokens", "64", "--ffn-num-param-tokens", "128",
            "--micro-batch-size", "8", "--global-batch-size", "8", "--train-iters", "100", "--lr", "5e-3",
            "--min-lr", "5e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "10",
            "--data-path", prefix, "--split", "95,5,0", "--tokenizer-model", model,
            "--log-interval", "5", "--eval-interval", "50", "--eval-iters", "2", "--tensorboard-dir", str(tb)]
    out = train_runs.check_ok(train_runs.run(train_runs.warm_launch(1, args), timeout=300))
    losses = [r["lm loss"] for r in train_runs.parse_iterations(out)]
    assert len(losses) == 20
    # starts near ln(vocab) (uniform guess over ~300 ids), ends far below it
    assert losses[0] > math.log(300) - 1.0
    assert losses[-1] < losses[0] - 2.0, losses
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 2.0
    validation = train_runs.parse_validation(out)
    assert len(validation) == 2 and all(map(math.isfinite, validation))
    assert validation[1] < validation[0] < losses[0] - 2.0  # held-out text: the model learnt the language
    assert "lm loss PPL: " in out
    acc = EventAccumulator(str(tb))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    for tag in ("lm loss", "learning-rate", "grad-norm", "tokens-per-sec", "tflops-per-gpu", "lm loss validation",
                "lm loss validation ppl"):
        assert tag in scalars, tag
    tb_losses = [e.value for e in acc.Scalars("lm loss")]
    assert tb_losses == pytest.approx(losses, rel=1e-6)


MOCK = train_runs.TINY_MODEL + ["--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "12",
                                "--lr", "2e-3", "--mock-data", "--vocab-size", "100", "--log-interval", "1",
                                "--eval-iters", "1", "--eval-interval", "12", "--seed", "3"]


@pytest.fixture(scope="module")
def fp32_losses():
    out = train_runs.check_ok(train_runs.run(train_runs.warm_launch(1, MOCK), timeout=120))
    return [r["lm loss"] for r in train_runs.parse_iterations(out)]


def test_bf16_pipeline_run_has_no_nan(fp32_losses):
    out = train_runs.check_ok(train_runs.run(train_runs.warm_launch(2, MOCK + ["--bf16"]
                                                                    + train_runs.layout_args(1, 2)),
                                             timeout=180))
    rows = train_runs.parse_iterations(out)
    assert len(rows) == 12
    assert all(math.isfinite(r["lm loss"]) and r["number of nan iterations"] == 0 for r in rows)
    assert [r["lm loss"] for r in rows] == pytest.approx(fp32_losses, rel=2e-2)  # bf16 rounding only
    assert all(math.isfinite(v) for v in train_runs.parse_validation(out))


def test_fp16_dynamic_loss_scaling_has_no_nan(fp32_losses):
    """Starting at 2^20 the first steps overflow: they are skipped and the scale halves, then training proceeds."""
    out = train_runs.check_ok(train_runs.run(
        train_runs.warm_launch(2, MOCK + ["--fp16", "--initial-loss-scale", str(2 ** 20), "--hysteresis", "1"]
                            + train_runs.layout_args(2, 1)), timeout=180))
    rows = train_runs.parse_iterations(out)
    assert len(rows) == 12
    assert all(math.isfinite(r["lm loss"]) and r["number of nan iterations"] == 0 for r in rows)
    scales = [r["loss scale"] for r in rows]
    assert all(s > 0 and math.log2(s) == int(math.log2(s)) for s in scales)  # powers of two
    skipped = sum(r["number of skipped iterations"] for r in rows)
    assert skipped < 12 and scales[-1] <= 2 ** 20
    assert all(math.isfinite(v) for v in train_runs.parse_validation(out))
    assert rows[0]["lm loss"] == pytest.approx(fp32_losses[0], rel=1e-2)  # same weights, same first batch
