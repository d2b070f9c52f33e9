"""Evaluating a checkpoint: loss and perplexity on held-out text (tools/evaluate_checkpoint.py).

One process, no process group: the checkpoint (any TP/PP/DP layout it was written at, or a canonical
folder from tools/expand_checkpoint.py) is read through :class:`~.checkpointing.format.view.CheckpointView`
into a TP = 1 model (Tokenformer or the baseline Transformer, whatever its config says). Meant for
models that fit one host's memory; the training loop's own validation covers the rest.

What is evaluated, deterministically (no shuffling, no sampling):

* ``--data-path PREFIX --split 969,30,1 --eval-split test``: the documents of that split of a
  preprocessed dataset (Megatron's contiguous document ranges, as training uses them), concatenated
  in order;
* ``--text FILE ...``: the documents of raw text / JSON-lines files (tools/preprocess_data.py's
  rules), tokenized with the checkpoint's tokenizer, each followed by the end-of-document token.

The token stream is cut into non-overlapping windows of ``seq_length + 1`` tokens (window i starts at
token i * seq_length; a shorter remainder is dropped) and the loss is the mean next-token
cross-entropy over every predicted token; perplexity = exp(loss).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from megatron_tokenformer.errors import TokenformerError

__all__ = ["EvaluationError", "EvaluationResult", "load_model", "split_tokens", "text_tokens", "evaluate_tokens",
           "checkpoint_tokenizer"]


class EvaluationError(TokenformerError, ValueError):
    """Bad input (message names the flag or file)."""


@dataclass
class EvaluationResult:
    loss: float
    perplexity: float
    tokens: int       # predicted tokens
    samples: int      # windows of seq_length + 1 tokens


def load_model(load_dir: str, iteration: Optional[int] = None):
    """(model in eval mode, its config, the step folder) from a checkpoint directory."""
    from megatron_tokenformer.checkpointing.format import files
    from megatron_tokenformer.checkpointing.format.view import CheckpointView
    from megatron_tokenformer.model import GPTModel

    if not os.path.isdir(load_dir):
        raise EvaluationError(f"--load {load_dir}: no such directory")
    step_dir = files.resolve_step_dir(load_dir, iteration)
    if step_dir is None:
        raise EvaluationError(f"--load {load_dir} has no `latest` file (nothing saved there yet); pass --iteration N")
    view = CheckpointView(step_dir)
    try:
        config = view.config
        model = GPTModel(config)
        params = dict(model.named_parameters())
        missing = sorted(set(params) - set(view.params))
        extra = sorted(set(view.params) - set(params))
        if missing or extra:
            raise EvaluationError(f"{step_dir}: the checkpoint's parameters do not match its model config "
                                  f"(missing {missing[:5]}, unexpected {extra[:5]})")
        with torch.no_grad():
            for name, param in params.items():
                full = view.read(name)
                if view.params[name].vocab and full.shape[0] < param.shape[0]:  # re-pad the vocabulary
                    pad = torch.zeros((param.shape[0] - full.shape[0],) + tuple(full.shape[1:]))
                    full = torch.cat([full, pad])
                param.copy_(full.to(param.dtype))
    finally:
        view.close()
    model.eval()
    return model, model.config, step_dir


def checkpoint_tokenizer(step_dir: str, tokenizer_model: Optional[str] = None):
    """The tokenizer stored in the checkpoint (or ``tokenizer_model`` when given): a sentencepiece
    model or a Hugging Face ``tokenizer.json`` (told apart by content; a folder holding a
    ``tokenizer.json`` works too)."""
    from megatron_tokenformer.checkpointing.format import files
    from megatron_tokenformer.data.tokenizer import load_tokenizer_file

    if tokenizer_model is not None:
        if os.path.isdir(tokenizer_model) and os.path.isfile(os.path.join(tokenizer_model, "tokenizer.json")):
            tokenizer_model = os.path.join(tokenizer_model, "tokenizer.json")
        if not os.path.isfile(tokenizer_model):
            raise EvaluationError(f"--tokenizer-model {tokenizer_model}: no such file")
        return load_tokenizer_file(tokenizer_model)
    path = os.path.join(step_dir, files.TOKENIZER_FILE)
    if not os.path.isfile(path):
        raise EvaluationError(f"{step_dir} stores no tokenizer (the run used none); pass --tokenizer-model")
    return load_tokenizer_file(path)


def split_tokens(data_prefix: str, split: str, which: str) -> np.ndarray:
    """The tokens of the ``which`` ("train", "valid", "test") documents of ``split``, in order."""
    from megatron_tokenformer.data.gpt_dataset import split_document_ranges
    from megatron_tokenformer.data.indexed_dataset import IndexedDataset, dataset_exists

    if not dataset_exists(data_prefix):
        raise EvaluationError(f"--data-path {data_prefix}: {data_prefix}.bin/.idx not found (write them with "
                              "tools/preprocess_data.py)")
    names = ("train", "valid", "test")
    if which not in names:
        raise EvaluationError(f"--eval-split must be one of {names}, got {which!r}")
    ds = IndexedDataset(data_prefix)
    try:
        begin, end = split_document_ranges(split, ds.num_documents)[names.index(which)]
    except ValueError as exc:
        raise EvaluationError(str(exc)) from None
    if end <= begin:
        raise EvaluationError(f"--split {split} gives the {which} split no documents of {data_prefix} "
                              f"({ds.num_documents} documents)")
    return np.concatenate([np.asarray(ds.get_document(d), dtype=np.int64) for d in range(begin, end)])


def text_tokens(paths: Sequence[str], tokenizer) -> np.ndarray:
    """Documents of raw text / JSON-lines files, tokenized, each followed by the end-of-document id."""
    from megatron_tokenformer.data.text_inputs import BadInputError, iter_documents

    out = []
    try:
        for doc in iter_documents(list(paths)):
            out.extend(tokenizer.tokenize(doc))
            out.append(tokenizer.eod)
    except (BadInputError, FileNotFoundError) as exc:
        raise EvaluationError(f"--text: {exc}") from None
    return np.asarray(out, dtype=np.int64)


@torch.no_grad()
def evaluate_tokens(model, tokens: np.ndarray, seq_length: int, micro_batch_size: int = 8,
                    max_samples: Optional[int] = None) -> EvaluationResult:
    """Mean next-token loss over non-overlapping windows of ``seq_length + 1`` tokens (see module doc)."""
    from megatron_tokenformer.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy

    samples = (len(tokens) - 1) // seq_length
    if max_samples is not None:
        samples = min(samples, max_samples)
    if samples < 1:
        raise EvaluationError(f"only {len(tokens)} tokens to evaluate: fewer than one window of seq_length + 1 = "
                              f"{seq_length + 1}")
    vocab = model.config.vocab_size
    if int(tokens.max()) >= vocab:
        raise EvaluationError(f"token id {int(tokens.max())} is outside the model's vocabulary ({vocab}): the data "
                              "was tokenized with another tokenizer")
    total, count = 0.0, 0
    for first in range(0, samples, micro_batch_size):
        n = min(micro_batch_size, samples - first)
        windows = np.stack([tokens[(first + i) * seq_length:(first + i) * seq_length + seq_length + 1]
                            for i in range(n)])
        batch = torch.from_numpy(windows)
        logits = model(batch[:, :-1])
        losses = vocab_parallel_cross_entropy(logits.float(), batch[:, 1:])
        total += float(losses.double().sum())
        count += losses.numel()
    loss = total / count
    return EvaluationResult(loss, math.exp(min(loss, 700.0)), count, samples)


def evaluate_checkpoint(load: str, iteration: Optional[int] = None, data_path: Optional[str] = None,
                        split: str = "969,30,1", eval_split: str = "test", text: Optional[Sequence[str]] = None,
                        tokenizer_model: Optional[str] = None, seq_length: Optional[int] = None,
                        micro_batch_size: int = 8, max_samples: Optional[int] = None) -> Tuple[EvaluationResult, dict]:
    """Everything tools/evaluate_checkpoint.py does; returns (result, description)."""
    if (data_path is None) == (not text):
        raise EvaluationError("give exactly one of --data-path and --text")
    model, config, step_dir = load_model(load, iteration)
    seq = config.seq_length if seq_length is None else int(seq_length)
    if not 1 <= seq <= config.max_position_embeddings:
        raise EvaluationError(f"--seq-length {seq} must lie in [1, {config.max_position_embeddings}] (the model's "
                              "max_position_embeddings)")
    if data_path is not None:
        tokens = split_tokens(data_path, split, eval_split)
        source = f"{eval_split} split ({split}) of {data_path}"
    else:
        tokens = text_tokens(text, checkpoint_tokenizer(step_dir, tokenizer_model))
        source = ", ".join(text)
    result = evaluate_tokens(model, tokens, seq, micro_batch_size, max_samples)
    n_params = sum(p.numel() for p in model.parameters())
    return result, {"step_dir": step_dir, "model_type": config.model_type, "parameters": n_params,
                    "seq_length": seq, "source": source}
