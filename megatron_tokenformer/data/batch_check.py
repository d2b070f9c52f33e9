"""Every batch's token ids checked on the host, before they reach the model.

The dataset build compares the vocabulary with ``PREFIX.meta.json``'s ``max_token_id`` (constant
time, so it trusts that file; a missing or stale one is rescanned). A ``.bin`` whose sidecar lies,
or that was changed after it was written, can still hold ids outside the vocabulary, and the model
must never see them: at TP 1 the embedding lookup fails (an ``IndexError`` on CPU, a device-side
assert on CUDA), at TP > 1 the vocabulary-parallel embedding and cross-entropy would treat the id
as belonging to no rank -- a zero embedding, a wrong loss -- and train on silently.

So the training loop checks each batch where it is still a host array (``text`` [b, s + 1], int64,
as the data loader returns it): one ``aminmax`` pass, about 0.1 ms for a [16, 4097] batch
(docs/data.md). Only when an id falls outside ``[0, vocab)`` is the batch searched: the first bad
id's sample (the batch carries each sample's dataset index, ``batch["index"]``) and position are
located by the dataset (:meth:`GPTDataset.locate`) to the ``.bin`` file and the document that
holds it, and the message names both (:func:`describe`).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from .indexed_dataset import IndexedDatasetError

__all__ = ["TokenIdError", "out_of_vocab", "describe", "locate_in_documents"]


class TokenIdError(IndexedDatasetError):
    """A batch holds a token id outside the vocabulary (the message is one line naming file and document)."""


def out_of_vocab(text, vocab_size: int) -> Optional[Tuple[int, int, int]]:
    """``(row, column, id)`` of the first id of ``text`` [b, n] outside ``[0, vocab_size)``, else None.

    ``text``: a torch tensor or a numpy array of integers. When every id fits (the normal case) the
    cost is one min/max pass over the array; nothing is allocated.
    """
    import torch
    ids = torch.as_tensor(text)
    if ids.numel() == 0:
        return None
    lo, hi = torch.aminmax(ids)
    if int(lo) >= 0 and int(hi) < vocab_size:
        return None
    ids = ids.reshape(ids.shape[0], -1) if ids.dim() > 1 else ids.reshape(1, -1)
    bad = ((ids < 0) | (ids >= vocab_size)).nonzero()
    row, col = (int(v) for v in bad[0])
    return row, col, int(ids[row, col])


def describe(dataset, sample_index: Optional[int], position: int, token_id: int, vocab_size: int,
             what: str) -> str:
    """One line naming the dataset file and document that hold ``token_id`` (token ``position`` of
    sample ``sample_index`` of ``dataset``); ``what``: e.g. ``"a training batch on rank 1"``."""
    where = None
    locate = getattr(dataset, "locate", None)
    if locate is not None and sample_index is not None:
        try:
            where = locate(int(sample_index), int(position))
        except (IndexError, ValueError):
            where = None
    if where is None:
        return (f"token id {token_id} does not fit the model's vocabulary of {vocab_size} (found in {what}, "
                f"sample {sample_index}, position {position}; was the dataset made with another tokenizer?)")
    path, document, offset = where
    return (f"{path}: document {document} holds token id {token_id} (its token {offset}), which does not fit the "
            f"model's vocabulary of {vocab_size} (found in {what}; was the dataset made with another tokenizer, "
            f"or its .meta.json written for other data?)")


def locate_in_documents(doc_idx: np.ndarray, doc_lengths: np.ndarray, first: int, offset: int,
                        position: int) -> Tuple[int, int]:
    """``(document, token offset in it)`` of stream token ``position`` of a sample that starts at
    token ``offset`` of ``doc_idx[first]`` (``doc_lengths``: token counts indexed by document id)."""
    j, at = int(first), int(offset) + int(position)
    while at >= int(doc_lengths[int(doc_idx[j])]):
        at -= int(doc_lengths[int(doc_idx[j])])
        j += 1
    return int(doc_idx[j]), at
