"""MegatronPretrainingSampler: DP partition and exact resume at any consumed-sample count."""

import numpy as np
import pytest
import torch

from megatron_tokenformer.data.gpt_dataset import MockGPTDataset
from megatron_tokenformer.data.samplers import MegatronPretrainingSampler, build_pretraining_data_loader


def run(total, consumed, mbs, dp, drop_last=True):
    """Global order of samples, step by step, ranks in order (what the DP group consumes)."""
    per_rank = [list(MegatronPretrainingSampler(total, consumed, mbs, r, dp, drop_last)) for r in range(dp)]
    steps = max(len(p) for p in per_rank)
    order = []
    for s in range(steps):
        for r in range(dp):
            if s < len(per_rank[r]):
                order.extend(per_rank[r][s])
    return per_rank, order


@pytest.mark.parametrize("mbs,dp", [(1, 1), (2, 3), (4, 2)])
def test_resume_continues_exactly(mbs, dp):
    total = 103
    gbs = mbs * dp
    full_ranks, full = run(total, 0, mbs, dp)
    # the uninterrupted run: consecutive indices, each rank its slice of every step
    n_steps = total // gbs
    assert full == list(range(n_steps * gbs))
    for r in range(dp):
        assert full_ranks[r] == [list(range(s * gbs + r * mbs, s * gbs + (r + 1) * mbs)) for s in range(n_steps)]
    for k in range(0, total, 7):
        resumed_ranks, resumed = run(total, k, mbs, dp)
        # exactly the samples not yet seen, in the same order
        expected = list(range(k, k + ((total - k) // gbs) * gbs))
        assert resumed == expected
        if k % gbs == 0:  # resuming at a step boundary replays the uninterrupted steps
            for r in range(dp):
                assert resumed_ranks[r] == full_ranks[r][k // gbs:]


def test_drop_last_false_covers_the_tail():
    _, order = run(10, 0, 2, 3, drop_last=False)
    assert sorted(order) == list(range(10))
    s = MegatronPretrainingSampler(10, 0, 2, 2, 3, drop_last=False)
    assert len(s) == len(list(s))


def test_bad_arguments():
    with pytest.raises(ValueError, match="consumed_samples=10"):
        MegatronPretrainingSampler(10, 10, 1, 0, 1)
    with pytest.raises(ValueError, match="data_parallel_rank=2"):
        MegatronPretrainingSampler(10, 0, 1, 2, 2)
    with pytest.raises(ValueError, match="micro_batch_size"):
        MegatronPretrainingSampler(10, 0, 0, 0, 1)


def test_data_loader_batches():
    ds = MockGPTDataset(40, 8, 100, seed=0)
    loader = build_pretraining_data_loader(ds, consumed_samples=12, micro_batch_size=3,
                                           data_parallel_rank=1, data_parallel_size=2)
    batches = list(loader)
    assert len(batches) == (40 - 12) // 6
    first = batches[0]["text"]
    assert first.dtype == torch.int64 and tuple(first.shape) == (3, 9)
    want = np.stack([ds[i]["text"] for i in (15, 16, 17)])
    assert np.array_equal(first.numpy(), want)
    assert build_pretraining_data_loader(None, 0, 1, 0, 1) is None


def test_loader_workers_ignore_the_launchers_signals():
    """A SIGTERM/SIGINT/SIGHUP/SIGUSR1 sent to the whole process group reaches the loader workers too; they must
    leave it to the training process (which saves and exits), not die and take the rank with them."""
    import os
    import signal

    import torch

    from megatron_tokenformer.data.samplers import build_pretraining_data_loader

    class Pids(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {"pid": torch.tensor(os.getpid()),
                    "handlers": torch.tensor([int(signal.getsignal(s) == signal.SIG_IGN)
                                              for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                                                        signal.SIGUSR1)])}

    loader = build_pretraining_data_loader(Pids(), 0, 2, 0, 1, num_workers=1)
    batch = next(iter(loader))
    assert int(batch["pid"][0]) != os.getpid()  # really a worker process
    assert batch["handlers"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    assert signal.getsignal(signal.SIGTERM) != signal.SIG_IGN  # the training process keeps its own handling


def test_a_process_with_live_loader_workers_still_exits(tmp_path):
    """The workers ignore SIGTERM, which is how multiprocessing stops daemonic children at exit: a rank
    that ends with a persistent loader iterator still referenced must not wait for them forever."""
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "exit_with_workers.py"
    script.write_text(textwrap.dedent("""
        import torch
        from megatron_tokenformer.data.samplers import build_pretraining_data_loader

        class Items(torch.utils.data.Dataset):
            def __len__(self):
                return 64

            def __getitem__(self, i):
                return {"text": torch.tensor([i])}

        loader = build_pretraining_data_loader(Items(), 0, 2, 0, 1, num_workers=2)
        it = iter(loader)
        next(it)
        KEEP = it  # still referenced when the interpreter exits
        print("ok", flush=True)
    """))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "killed by signal" not in result.stderr, result.stderr[-2000:]
