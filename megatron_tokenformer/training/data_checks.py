"""A batch with a token id outside the vocabulary: found on the host, agreed by every rank, one line.

Each micro-batch the loop draws is checked before it becomes a device tensor
(:func:`check_batch`, one ``aminmax`` over ``text`` [b, s + 1]; :mod:`..data.batch_check`). A rank
that finds a bad id cannot stop on its own: the other ranks would wait in the step's collectives
(TP all-reduces, the data-parallel gradient reduction) for the whole collective timeout. It
records the message (naming the ``.bin`` file and the document), replaces the bad ids by 0 so the
step it is in completes everywhere without touching the embedding out of range, and goes on.
:func:`agree` -- called where the loop already waits for the host (each ``--log-interval``, save
and exit iteration, after an evaluation) -- all-reduces a flag; when any rank has a message every
rank raises :class:`~..data.batch_check.TokenIdError` with the first such rank's line, before
anything is logged or saved for that iteration. The run ends with exit 2 and that one line on
every rank (``training/supervision/failures.py``); the weights updated with the replaced ids are never saved.
The cost in the normal case: the host ``aminmax`` and one flag all-reduce per log interval.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_tokenformer import parallel_state
from megatron_tokenformer.data.batch_check import TokenIdError, describe, out_of_vocab

__all__ = ["check_batch", "agree", "pending", "reset"]

_pending: Optional[str] = None  # this rank's first message, until agree() raises it


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def check_batch(batch: dict, dataset, vocab_size: Optional[int], split: str) -> torch.Tensor:
    """``batch["text"]`` [b, s + 1] with every id checked against ``[0, vocab_size)`` on the host.

    A bad id is recorded (the first per rank, see the module docstring) and every out-of-range id of
    the batch replaced by 0, in place when ``text`` is a tensor. ``dataset``: what the loader reads
    (its ``locate`` names the file and document; ``batch["index"]`` holds the samples' indices).
    """
    global _pending
    text = batch["text"]
    if not torch.is_tensor(text):
        text = torch.as_tensor(text)
    if vocab_size is None:
        return text
    found = out_of_vocab(text, vocab_size)
    if found is None:
        return text
    row, col, token_id = found
    if _pending is None:
        indices = batch.get("index")
        sample = None if indices is None else int(torch.as_tensor(indices).reshape(-1)[row])
        _pending = describe(dataset, sample, col, token_id, vocab_size, f"a {split} batch on rank {_rank()}")
    return text.masked_fill_((text < 0) | (text >= vocab_size), 0)


def pending() -> Optional[str]:
    return _pending


def reset() -> None:
    global _pending
    _pending = None


def agree() -> None:
    """Collective: raise TokenIdError on every rank when any rank has recorded a bad batch (one flag
    all-reduce; the message is gathered only then)."""
    local = _pending
    if torch.distributed.is_initialized():
        from megatron_tokenformer.tensor_parallel.mappings import all_gather_objects, all_reduce_over
        flag = torch.tensor([0.0 if local is None else 1.0], device=parallel_state.get_communication_device())
        if all_reduce_over(flag, "world", op="max").item() == 0.0:
            return
        messages = [m for m in all_gather_objects(local) if m]
        local = messages[0]
    elif local is None:
        return
    raise TokenIdError(local)
