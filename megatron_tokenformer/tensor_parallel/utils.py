"""Small helpers for tensor-parallel shapes."""

from __future__ import annotations

from typing import Tuple


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
