"""Text generation with this system's model (any TP; PP = 1 model built from a checkpoint of any layout).

A step runs the model's own forward over the new positions with a
:class:`~megatron_tokenformer.model.attention.KVCache` (each layer's rotated keys and values of the
rank's own heads; Pattention keeps no per-sequence state, so nothing else is cached): the cached
computation is the training model's function, attention included. ``use_cache=False`` recomputes
the whole prefix every step (the reference the cache is tested against).

Sampling: greedy (argmax), or temperature -> top-k -> top-p (nucleus) -> multinomial from a
``torch.Generator`` seeded identically on every TP rank (all ranks draw the same token).
Generation of a sequence stops at the end-of-document token (kept out of the text).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional

import torch

from megatron_tokenformer import parallel_state
from megatron_tokenformer.errors import TokenformerError
from megatron_tokenformer.model.attention import KVCache

__all__ = ["SamplingOptions", "load_model_for_inference", "generate_tokens", "GenerationError"]


class GenerationError(TokenformerError, ValueError):
    """Bad request (the message names the flag)."""


@dataclass
class SamplingOptions:
    max_new_tokens: int = 32
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 1234
    use_cache: bool = True
    stop_at_eod: bool = True

    def check(self) -> "SamplingOptions":
        if self.max_new_tokens < 1:
            raise GenerationError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if not self.greedy and not self.temperature > 0:
            raise GenerationError(f"--temperature must be > 0, got {self.temperature} (use --greedy for argmax)")
        if self.top_k < 0:
            raise GenerationError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise GenerationError(f"--top-p must be in (0, 1], got {self.top_p}")
        return self


def load_model_for_inference(load_dir: str, iteration: Optional[int] = None):
    """(model in eval mode at the current TP, config, step folder). parallel_state must be initialised
    (or not at all, for TP = 1); each rank reads only its slice."""
    from megatron_tokenformer.interop.checkpoint_format import FP32, open_step
    from megatron_tokenformer.model import GPTModel

    view = open_step(load_dir, iteration)
    try:
        config = view.config
        tp = parallel_state.get_tensor_model_parallel_world_size()
        rank = parallel_state.get_tensor_model_parallel_rank()
        try:
            model = GPTModel(inference_config(config))
        except ValueError as exc:
            raise GenerationError(f"--load {load_dir}: the model does not fit tensor parallel size {tp}: "
                                  f"{exc}") from None
        padded = model.config.padded_vocab_size(tp)
        params = dict(model.named_parameters())
        missing = sorted(set(params) - set(view.params))
        if missing:
            raise GenerationError(f"{view.step_dir}: parameter {missing[0]} missing from the checkpoint")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(view.read_tp_slice(name, FP32, rank, tp, padded if view.params[name].vocab else None))
        step_dir = view.step_dir
    finally:
        view.close()
    model.eval()
    return model, model.config, step_dir


def inference_config(config):
    """``config`` for decoding: sequence parallelism off. A decoding step runs one position, which does
    not split over the TP ranks; the field is a runtime one (a checkpoint trained with it computes the
    same function without it), so generation at any TP reads a checkpoint trained with or without it."""
    return dataclasses.replace(config, sequence_parallel=False)


def _gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    """Vocab-parallel [..., V/p] -> [..., V] on every rank."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return logits
    from megatron_tokenformer.tensor_parallel.mappings import gather_from_tensor_model_parallel_region
    return gather_from_tensor_model_parallel_region(logits)


@torch.no_grad()
def forward_step(model, ids: torch.Tensor, kv_cache: Optional[KVCache]) -> torch.Tensor:
    """ids [b, s] -> full-vocabulary logits [b, s, V] (fp32, padding columns removed). With ``kv_cache``
    the ids follow its cached positions (and are appended to it); without, they are the whole sequence."""
    logits = _gather_vocab(model(ids, kv_cache=kv_cache))
    return logits[..., : model.config.vocab_size].float()


def _choose(logits: torch.Tensor, opts: SamplingOptions, gen: torch.Generator) -> torch.Tensor:
    """logits [b, V] fp32 -> token ids [b]."""
    if opts.greedy:
        return logits.argmax(dim=-1)
    logits = logits / opts.temperature
    if opts.top_k > 0:
        kth = torch.topk(logits, min(opts.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if opts.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        remove = probs.cumsum(dim=-1) - probs > opts.top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def generate_tokens(model, prompt_ids: List[int], opts: SamplingOptions, eod: Optional[int] = None,
                    on_token: Optional[Callable[[int], None]] = None) -> List[int]:
    """Generate up to ``opts.max_new_tokens`` tokens after ``prompt_ids`` (one sequence); returns the new
    ids (without the end-of-document token). ``on_token`` is called with each new id as it is chosen."""
    opts.check()
    if not prompt_ids:
        raise GenerationError("empty prompt: give at least one token of text (or the prompt-file is empty)")
    limit = model.config.max_position_embeddings
    if len(prompt_ids) >= limit:
        raise GenerationError(f"the prompt has {len(prompt_ids)} tokens; the model's positions end at {limit}")
    gen = torch.Generator().manual_seed(int(opts.seed))
    ids = list(prompt_ids)
    cache = KVCache.empty(len(model.layers)) if opts.use_cache else None
    new: List[int] = []
    step_ids = torch.tensor([ids], dtype=torch.long)
    for _ in range(opts.max_new_tokens):
        if len(ids) >= limit:
            break
        if opts.use_cache:
            logits = forward_step(model, step_ids, cache)
        else:
            logits = forward_step(model, torch.tensor([ids], dtype=torch.long), None)
        token = int(_choose(logits[:, -1], opts, gen)[0])
        if opts.stop_at_eod and eod is not None and token == eod:
            break
        ids.append(token)
        new.append(token)
        if on_token is not None:
            on_token(token)
        step_ids = torch.tensor([[token]], dtype=torch.long)
    return new


def iter_prompts(prompts: List[str], prompt_file: Optional[str]) -> Iterator[str]:
    for p in prompts or []:
        yield p
    if prompt_file is not None:
        if not os.path.isfile(prompt_file):
            raise GenerationError(f"--prompt-file {prompt_file}: no such file")
        with open(prompt_file, encoding="utf-8") as f:
            for line in f:
                line = line.rstrip("\n")
                if line.strip():
                    yield line
