"""examples/progressive_scaling/progressive_scaling.sbatch on a real (one-node) Slurm cluster: a stage that
reaches its time limit requeues itself until its iterations are done, and the next stage, submitted with
``--dependency=afterok``, starts only after that and grows the FINISHED checkpoint.

Two stages of a tiny model (CONFIG_DIR: the same file layout as configs/, 2 ranks on CPUs, a real
SentencePiece tokenizer and indexed dataset). Stage 1 is frozen once its training loop runs, its time limit
is cut so that the script's own ``--signal=USR1@300`` warning is due, and the ranks continue once Slurm's
signal is pending in both (tests/helpers/slurm_jobs.py explains why: Slurm checks limits every ~30 s).
"""

import os
import re
import signal
import sys

import pytest

from tests.helpers import corpus_gen, train_runs
from tests.helpers import slurm_jobs as S
from tests.unit.test_launch import LOCAL_CLUSTER, slurm_cluster  # noqa: F401 - the local Slurm cluster fixture

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SCRIPT = os.path.join(train_runs.ROOT, "examples", "progressive_scaling", "progressive_scaling.sbatch")
SLURM = S.SlurmClient()
STAGE1_ITERS = 30
STAGE2_ITERS = 3
COMMON = """# a tiny model for a trial run on CPUs (same layout as examples/progressive_scaling/configs)
--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --max-position-embeddings 16
--global-batch-size 4 --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters 2
--split 90,10,0 --log-interval 1 --eval-interval 100000 --eval-iters 0 --save-interval 100000 --num-workers 0
"""
STAGES = {"124M": f"--qkv-num-param-tokens 16 --proj-num-param-tokens 16 --ffn-num-param-tokens 32\n"
                  f"--tensor-model-parallel-size 1 --micro-batch-size 2 --train-iters {STAGE1_ITERS}\n",
          "354M": f"--qkv-num-param-tokens 32 --proj-num-param-tokens 32 --ffn-num-param-tokens 64\n"
                  f"--tensor-model-parallel-size 1 --micro-batch-size 2 --train-iters {STAGE2_ITERS}\n"}


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory):
    """A config folder for two stages, a SentencePiece model and an indexed dataset."""
    from megatron_tokenformer.data.preprocess import preprocess
    from megatron_tokenformer.data.tokenizer import train_sentencepiece

    d = tmp_path_factory.mktemp("progressive")
    (d / "configs").mkdir()
    (d / "configs" / "common.args").write_text(COMMON)
    for stage, text in STAGES.items():
        (d / "configs" / f"tokenformer_{stage}.args").write_text(text)
    docs = corpus_gen.make_documents(600, seed=1)
    corpus_gen.write_blank_line_text(str(d / "corpus.txt"), docs)
    model = train_sentencepiece(iter([line for doc in docs for line in doc.splitlines()]), str(d / "tok"),
                                vocab_size=400, num_threads=1)
    preprocess([str(d / "corpus.txt")], str(d / "corpus"), tokenizer_model=model, append_eod=True, workers=1,
               log=lambda _msg: None)
    return d


def _submit(recipe, stage, log, dependency=None):
    args = ["--nodes", "1", "--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=30",
            "-o", str(log),
            f"--export=ALL,PYTHON={sys.executable},REPO={train_runs.ROOT},STAGE={stage},"
            f"DATA_PATH={recipe / 'corpus_text_document'},TOKENIZER_MODEL={recipe / 'tok.model'},"
            f"RUN_DIR={recipe / 'run'},CONFIG_DIR={recipe / 'configs'},GPUS_PER_NODE=2"]
    if dependency:
        args.append(f"--dependency=afterok:{dependency}")
    return SLURM.sbatch(args + [SCRIPT], env=train_runs.env({"OMP_NUM_THREADS": ""}), cwd=str(recipe))


def test_stage_requeues_at_its_time_limit_and_the_next_stage_grows_the_finished_checkpoint(slurm_cluster,  # noqa: F811 - the fixture
                                                                                           tiny_recipe):
    log1, log2 = tiny_recipe / "stage1.out", tiny_recipe / "stage2.out"
    j1 = _submit(tiny_recipe, "124M", log1)
    j2 = _submit(tiny_recipe, "354M", log2, dependency=j1)
    try:
        pids = S.wait_for_handlers(j1, 2, signal.SIGUSR1, 600, str(log1), cluster=LOCAL_CLUSTER)
        S.freeze_until_signalled(pids, lambda: SLURM.cut_time_limit(j1, 300), signal.SIGUSR1, 120, str(log1))
        S.wait(lambda: "requeueing job" in S.read(str(log1)) or SLURM.job_state(j1) in S.ENDED, 300,
               "stage 1 to save and requeue", str(log1))
        assert "requeueing job" in S.read(str(log1)), S.read(str(log1))[-4000:]
        # requeued, stage 1 is not COMPLETED: the next stage still waits on its dependency
        S.wait(lambda: SLURM.job_state(j1) == "PENDING", 120, "the requeued job to be pending", str(log1))
        waiting = SLURM.job_fields(j2)
        assert (waiting["JobState"], waiting["Reason"]) == ("PENDING", "Dependency"), waiting
        SLURM.release(j1, time_limit_minutes=30)
        assert SLURM.wait_ended(j1, 900, log=str(log1)) in ("COMPLETED", "GONE"), S.read(str(log1))[-4000:]
        assert SLURM.wait_ended(j2, 900, log=str(log2)) in ("COMPLETED", "GONE"), S.read(str(log2))[-4000:]
    finally:
        SLURM.scancel(j1, j2)
    text1, text2 = S.read(str(log1)), S.read(str(log2))
    stops = [int(m) for m in re.findall(r"> exit status: unfinished (\d+)/%d signal SIGUSR1" % STAGE1_ITERS, text1)]
    assert len(stops) == 1 and 0 < stops[0] < STAGE1_ITERS, text1[-4000:]
    # one log for both starts (--open-mode=append); the restart resumed where the warning's save left off
    assert f"job {j1} (start 1)" in text1 and f"job {j1} (start 2)" in text1
    assert [int(m) for m in re.findall(r"> training from iteration (\d+) to", text1)] == [0, stops[0]]
    assert f"> exit status: finished {STAGE1_ITERS}/{STAGE1_ITERS}" in text1
    assert (tiny_recipe / "run" / "124M" / "exit_status").read_text().startswith(f"finished {STAGE1_ITERS}/")
    # stage 2 grew the checkpoint of the last iteration, then trained from it
    m = re.search(r"source: (\S+) \(\w+, iteration (\d+),", text2)
    assert m and int(m.group(2)) == STAGE1_ITERS, text2[-4000:]
    assert "> training from iteration 0 to %d" % STAGE2_ITERS in text2
    assert f"> exit status: finished {STAGE2_ITERS}/{STAGE2_ITERS}" in text2
    rows = train_runs.parse_iterations(text2)
    assert [r["iteration"] for r in rows] == list(range(1, STAGE2_ITERS + 1))
