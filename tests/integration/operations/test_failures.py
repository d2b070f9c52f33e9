"""What happens when training meets a numerical failure, a full or read-only disk, or bad data: one error
line, a non-zero exit, no checkpoint lost or half-written (one rank, tiny model)."""

import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from tests.helpers import ops_checks as C
from tests.helpers import train_runs

pytestmark = pytest.mark.slow

ARGS = train_runs.TINY_MODEL + ["--micro-batch-size", "2", "--global-batch-size", "4", "--vocab-size", "100",
                                "--log-interval", "5", "--eval-iters", "0", "--seed", "7"]


def _run(args, timeout=240):
    # forked by the suite's fork server: exit status, stdout and stderr are the run's own
    return train_runs.run(train_runs.warm_launch(1, ARGS + list(args)), timeout=timeout)


def test_nan_loss_ends_the_run_without_saving_it(tmp_path):
    save = str(tmp_path / "ckpt")
    # a learning rate of 1e30: the first update makes the weights overflow, the next loss is not finite
    r = _run(["--mock-data", "--train-iters", "20", "--lr", "1e30", "--lr-warmup-iters", "0", "--save", save,
              "--save-interval", "1"])
    assert r.returncode == 1, r.stdout[-3000:]
    line = C.assert_one_error_line(r.stdout)
    assert line.startswith("pretrain_tokenformer.py: error: iteration 2: the gradient norm is NaN or Inf"), line
    assert C.step_names(save) == ["global_step1"] and C.latest(save) == "global_step1"
    assert C.leftovers(save) == []


def test_fp16_consecutive_overflow_skips_end_the_run(tmp_path):
    # a static loss scale of 2^32 overflows fp16 on every step
    r = _run(["--mock-data", "--train-iters", "20", "--lr", "1e-3", "--fp16", "--loss-scale", "4294967296",
              "--max-skipped-iterations", "3"])
    assert r.returncode == 1, r.stdout[-3000:]
    line = C.assert_one_error_line(r.stdout)
    assert line == ("pretrain_tokenformer.py: error: iteration 4: 4 consecutive iterations skipped for fp16 overflow "
                    "(more than --max-skipped-iterations 3); iteration 4 was not saved")


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 600 KiB file system (one tiny checkpoint fits, two do not); needs root and mount."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {r.stderr.strip()}")
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_disk_then_read_only_save_folder(small_tmpfs):
    save = os.path.join(small_tmpfs, "ckpt")
    r = _run(["--mock-data", "--train-iters", "6", "--lr", "1e-3", "--save", save, "--save-interval", "2"])
    assert r.returncode == 1, r.stdout[-3000:]
    line = C.assert_one_error_line(r.stdout)
    assert line.startswith(f"pretrain_tokenformer.py: error: saving iteration 4 into --save {save} failed on rank 0: "
                           "ENOSPC (No space left on device)"), line
    assert "`latest` still names the previous step" in line
    assert C.latest(save) == "global_step2" and C.step_names(save) == ["global_step2"] and C.leftovers(save) == []
    before = C.tree_hashes(save, ["global_step2"])

    subprocess.run(["mount", "-o", "remount,ro", small_tmpfs], check=True)
    r = _run(["--mock-data", "--train-iters", "6", "--lr", "1e-3", "--load", save, "--save", save,
              "--save-interval", "2"], timeout=180)
    assert r.returncode == 2, r.stdout[-3000:]
    line = C.assert_one_error_line(r.stdout)
    assert line == (f"pretrain_tokenformer.py: error: --save {save} is not writable (rank 0): "
                    "EROFS (Read-only file system)")
    assert "iteration        1/" not in r.stdout   # refused before training, not at the first save
    assert C.tree_hashes(save, ["global_step2"]) == before


def test_truncated_bin_is_one_line(tmp_path):
    from megatron_tokenformer.data.indexed_dataset import IndexedDatasetBuilder
    prefix = str(tmp_path / "corpus_text_document")
    rng = np.random.default_rng(0)
    with IndexedDatasetBuilder(prefix, dtype=np.uint16) as b:
        for _ in range(50):
            b.add_document(rng.integers(0, 100, 40))
    with open(prefix + ".bin", "r+b") as f:           # cut the last document short
        f.truncate(os.path.getsize(prefix + ".bin") - 30)
    common = ["--train-iters", "2", "--lr", "1e-3", "--tokenizer-type", "NullTokenizer", "--split", "100,0,0"]
    r = _run(common + ["--data-path", prefix])
    assert r.returncode == 2, r.stdout[-3000:]
    line = C.assert_one_error_line(r.stdout)
    assert f"{prefix}.bin" in line and "truncated" in line, line
    # (corrupt .idx, out-of-vocabulary ids and zero blend weights raise from the same dataset build, each
    # tested for its message in tests/unit/data; this run checks that pretraining turns them into one line)


# ---- a full disk on one rank of two: the outcome of the save is agreed at once (not after the collective
# timeout), every rank prints the same line, the .partial goes, `latest` stays, the previous step resumes

DP2 = train_runs.TINY_MODEL + ["--micro-batch-size", "2", "--global-batch-size", "4", "--vocab-size", "100",
                               "--lr", "1e-3", "--mock-data", "--log-interval", "1", "--eval-iters", "0", "--seed", "7",
                               "--zero-stage", "1", "--train-iters", "4", "--save-interval", "2",
                               "--distributed-timeout-minutes", "1"]
WRITE_FAULTS = os.path.join(train_runs.ROOT, "tests", "helpers", "write_faults")


def _run_two_ranks(args, extra_env=None):
    """torchrun with 2 ranks; returns (result, {rank: exit code}) after checking that no rank is left."""
    p = train_runs.start(train_runs.torchrun(2, DP2 + args), extra_env)
    pids = [p.pid] + [r.pid for r in C.rank_processes(p.pid, 2)]
    r = train_runs.finish(p, timeout=300)
    C.wait_gone(pids, 30)
    exits = dict(re.findall(r"rank\s+: (\d+) \(local_rank: \d+\)\s+exitcode\s+: (-?\d+)", r.stdout))
    return r, {int(k): int(v) for k, v in exits.items()}


def _losses(text):
    return {row["iteration"]: row["lm loss"] for row in train_runs.parse_iterations(text)}


def _assert_save_failed_everywhere(r, exits, save):
    # each rank exits 1 -- or, when the other exited first, torchrun's SIGTERM ends it after its line was out
    assert r.returncode != 0 and sorted(exits) == [0, 1] and set(exits.values()) <= {1, -15} \
        and 1 in exits.values(), r.stdout[-4000:]
    line = C.assert_one_error_line(r.stdout, count=2, torchrun=True)
    assert C.error_lines(r.stdout) == [line, line]               # the same line on both ranks
    # the agreed outcome, not the collective timeout's "a collective failed ... stopped answering"
    assert re.match(rf"pretrain_tokenformer\.py: error: saving iteration 4 into --save {re.escape(save)} failed on "
                    r"rank [01]: ENOSPC \(No space left on device\) writing .*; the partial step was removed and "
                    r"`latest` still names the previous step$", line), line
    assert C.latest(save) == "global_step2" and C.step_names(save) == ["global_step2"] and C.leftovers(save) == []
    return line


def test_full_disk_on_one_rank_of_two_then_for_real(tmp_path):
    # 1. rank 1's writes into step 4 fail with ENOSPC halfway through a file (tests/helpers/write_faults)
    save = str(tmp_path / "ckpt")
    faults = {"PYTHONPATH": WRITE_FAULTS + os.pathsep + train_runs.ROOT, "TOKENFORMER_TEST_ENOSPC_RANKS": "1",
              "TOKENFORMER_TEST_ENOSPC_PATH": "global_step4.partial"}
    r, exits = _run_two_ranks(["--save", save], faults)
    line = _assert_save_failed_everywhere(r, exits, save)
    assert "failed on rank 1: ENOSPC (No space left on device) writing " \
           f"{save}/global_step4.partial/zero_pp_rank_1_mp_rank_00_optim_states.pt;" in line, line
    first = _losses(r.stdout)
    assert sorted(first) == [1, 2, 3, 4]

    # 2. step 2 resumes (the losses of iterations 3 and 4 are those of run 1), from a small tmpfs that the
    #    save of step 4 fills up for real (whichever rank meets it first)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)],
                             capture_output=True).returncode == 0
    try:
        resumed = str(mnt / "ckpt") if mounted else str(tmp_path / "resumed")
        shutil.copytree(save, resumed, ignore=shutil.ignore_patterns("tokenformer_save.lock"))
        before = C.tree_hashes(resumed, ["global_step2"])
        r, exits = _run_two_ranks(["--load", resumed, "--save", resumed])
        second = _losses(r.stdout)
        assert {i: second.get(i) for i in (3, 4)} == {i: first[i] for i in (3, 4)}, r.stdout[-3000:]
        if mounted:
            _assert_save_failed_everywhere(r, exits, resumed)
            assert C.tree_hashes(resumed, ["global_step2"]) == before
        else:  # no tmpfs here (not root): the resume alone
            assert r.returncode == 0 and C.latest(resumed) == "global_step4", r.stdout[-3000:]
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
