"""tensor_parallel/utils.py: exact division and contiguous partition ranges, against hand-written tables."""

import pytest

from megatron_tokenformer.tensor_parallel.utils import VocabUtility, divide, partition_range


def test_divide():
    assert divide(12, 4) == 3 and divide(0, 3) == 0
    with pytest.raises(ValueError, match=r"^hidden_size \(10\) is not divisible by 4$"):
        divide(10, 4, "hidden_size")


def test_partition_range_tiles_the_dimension():
    assert [partition_range(12, r, 3) for r in range(3)] == [(0, 4), (4, 8), (8, 12)]
    assert partition_range(7, 0, 1) == (0, 7)
    with pytest.raises(ValueError, match=r"^rows \(10\) is not divisible by 4$"):
        partition_range(10, 1, 4, "rows")


def test_vocab_range():
    assert [VocabUtility.vocab_range_from_global_vocab_size(52, r, 4) for r in range(4)] == \
        [(0, 13), (13, 26), (26, 39), (39, 52)]
    with pytest.raises(ValueError, match=r"padded vocabulary size \(51\) is not divisible by 2"):
        VocabUtility.vocab_range_from_global_vocab_size(51, 0, 2)
