"""Small helpers for tensor-parallel shapes."""

from __future__ import annotations

from typing import Tuple

import torch


def divide(numerator: int, denominator: int, what: str = "value") -> int:
    """Exact integer division; ValueError naming ``what`` when it does not divide."""
    if numerator % denominator != 0:
        raise ValueError(f"{what} ({numerator}) is not divisible by {denominator}")
    return numerator // denominator


def partition_range(global_size: int, rank: int, world_size: int, what: str = "dimension") -> Tuple[int, int]:
    """[start, end) of rank's contiguous block when ``global_size`` is split evenly over ``world_size``."""
    per = divide(global_size, world_size, what)
    return rank * per, (rank + 1) * per


class VocabUtility:
    """Vocabulary range [first, last) owned by a tensor-parallel rank (Megatron's name)."""

    @staticmethod
    def vocab_range_from_global_vocab_size(global_vocab_size: int, rank: int, world_size: int) -> Tuple[int, int]:
        return partition_range(global_vocab_size, rank, world_size, "padded vocabulary size")


def check_token_ids(ids: torch.Tensor, limit: int, what: str) -> None:
    """Every id of ``ids`` in ``[0, limit)``, or the process does not go on with it.

    On the CPU: one ``aminmax``, and a ValueError naming ``what``, the id and the range. On an
    accelerator: ``torch._assert_async`` -- two comparisons and a reduction queued on the device,
    no host synchronisation; a bad id ends the process with a device-side assert at its next
    synchronisation (loudly, never silently; the rank's peers then see it stop answering). The
    training loop's host-side check of every batch (training/data_checks.py) comes first and ends
    a run with one line; this guards every other caller (generation, evaluation, tools).
    """
    if ids.numel() == 0:
        return
    if ids.device.type == "cpu":
        lo, hi = (int(v) for v in torch.aminmax(ids))
        if lo < 0 or hi >= limit:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{what}: token id {bad} is outside the vocabulary [0, {limit})")
    else:
        torch._assert_async(((ids >= 0) & (ids < limit)).all())
