"""Raw text -> tokenized ``PREFIX_{key}_document.bin/.idx`` (the engine of tools/preprocess_data.py).

Pipeline (one writer, a pool of tokenizer processes)::

    main process: read bytes chunk (~1 MB, ends on a document boundary)
        -> pool worker: decode, split into documents / parse JSON, sentencepiece
           batch-encode (1 thread), pack into one numpy array + lengths
        -> main process: append to IndexedDatasetBuilder (one buffered write per chunk)

At most ``2 * workers + 2`` chunks are in flight (``apply_async`` with a bounded window;
``Pool.imap`` would read the whole input ahead), and the builder spills lengths to
disk, so memory is flat in the input size. Output order equals input order.
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing as mp
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from megatron_tokenformer.fileio import check_outputs_apart

from .indexed_dataset import IndexedDatasetBuilder, best_fitting_dtype, data_file_path, index_file_path
from .text_inputs import BadInputError, Chunk, expand_inputs, file_format, input_paths, iter_chunks, parse_chunk
from .tokenizer import build_tokenizer

__all__ = ["preprocess", "output_prefix_for_key", "encode_chunk", "existing_outputs",
           "check_preprocess_outputs_apart"]

_worker_state: dict = {}


def output_prefix_for_key(output_prefix: str, key: str) -> str:
    """Megatron's naming: ``{output_prefix}_{key}_document``."""
    return f"{output_prefix}_{key}_document"


def existing_outputs(output_prefix: str, json_keys: Sequence[str]) -> List[str]:
    """The ``.bin``/``.idx`` files that a run with these arguments would replace (sorted paths)."""
    out = []
    for key in json_keys:
        prefix = output_prefix_for_key(output_prefix, key)
        out += [p for p in (data_file_path(prefix), index_file_path(prefix)) if os.path.exists(p)]
    return sorted(out)


def check_preprocess_outputs_apart(inputs: Sequence[str], output_prefix: str, json_keys: Sequence[str],
                                   tokenizer_model: Optional[str] = None) -> None:
    """OverlapError (one line) when a ``.bin``/``.idx`` this run writes is, or lies inside, or holds an
    ``--input`` (or the ``--tokenizer-model``); with ``--overwrite`` too."""
    outputs = []
    for key in json_keys:
        prefix = output_prefix_for_key(output_prefix, key)
        outputs += [("--output-prefix", data_file_path(prefix)), ("--output-prefix", index_file_path(prefix))]
    check_outputs_apart(outputs, [("--input", p) for p in input_paths(inputs)]
                        + [("--tokenizer-model", tokenizer_model)])


def _init_worker(tokenizer_args: dict, json_keys, append_eod, skip_bad_lines, dtype_str):
    _worker_state.update(
        tokenizer=build_tokenizer(**tokenizer_args),
        json_keys=list(json_keys),
        append_eod=append_eod,
        skip_bad_lines=skip_bad_lines,
        dtype=np.dtype(dtype_str),
    )


def encode_chunk(chunk: Chunk, tokenizer=None, json_keys=None, append_eod=None,
                 skip_bad_lines=None, dtype=None) -> dict:
    """Parse and tokenize one chunk. Returns per key ``(tokens, lengths)`` and counters."""
    st = _worker_state
    tokenizer = tokenizer if tokenizer is not None else st["tokenizer"]
    json_keys = json_keys if json_keys is not None else st["json_keys"]
    append_eod = append_eod if append_eod is not None else st["append_eod"]
    skip_bad_lines = skip_bad_lines if skip_bad_lines is not None else st["skip_bad_lines"]
    dtype = np.dtype(dtype if dtype is not None else st["dtype"])
    keys = list(json_keys) if chunk.fmt == "jsonl" else [json_keys[0]]
    parsed = parse_chunk(chunk, keys, skip_bad_lines)
    out = {}
    for key in keys:
        ids = tokenizer.tokenize_batch(parsed.docs[key], append_eod=append_eod)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        total = int(lengths.sum())
        tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=total)
        out[key] = (tokens, lengths)
    return {"data": out, "bytes": parsed.num_bytes, "bad": parsed.bad, "empty": parsed.empty}


def _encode_in_worker(chunk: Chunk) -> dict:
    return encode_chunk(chunk)


def preprocess(
    inputs: Sequence[str],
    output_prefix: str,
    tokenizer_type: str = "SentencePieceTokenizer",
    tokenizer_model: Optional[str] = None,
    vocab_size: Optional[int] = None,
    json_keys: Sequence[str] = ("text",),
    append_eod: bool = False,
    workers: int = 1,
    log_interval: int = 10000,
    input_format: str = "auto",
    document_boundary: str = "blank-line",
    skip_bad_lines: bool = False,
    chunk_bytes: int = 1 << 20,
    log: Optional[Callable[[str], None]] = None,
) -> Dict[str, object]:
    """Tokenize ``inputs`` into one indexed dataset per JSON key. Returns a stats dict.

    Raises ``BadInputError`` / ``TokenizerError`` naming the file; nothing is left behind.
    """
    if log is None:
        def log(msg):
            print(msg, file=sys.stderr, flush=True)
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if not json_keys:
        raise ValueError("--json-keys needs at least one key")
    files = expand_inputs(inputs)
    check_preprocess_outputs_apart(inputs, output_prefix, json_keys, tokenizer_model)
    if len(json_keys) > 1:
        for f in files:
            if file_format(f, input_format) == "text":
                raise BadInputError(
                    f"{f}: plain text has no keys; several --json-keys need JSON-lines input"
                )
    tok_args = dict(tokenizer_type=tokenizer_type, tokenizer_model=tokenizer_model,
                    vocab_size=vocab_size)
    tokenizer = build_tokenizer(**tok_args)  # fails here, before any file is written
    dtype = best_fitting_dtype(tokenizer.vocab_size)
    keys = list(json_keys)
    meta = {
        "tokenizer_type": tokenizer_type,
        "tokenizer_model": os.path.abspath(tokenizer_model) if tokenizer_model else None,
        "vocab_size": tokenizer.vocab_size,
        "append_eod": bool(append_eod),
        "document_boundary": document_boundary,
    }
    builders = {
        k: IndexedDatasetBuilder(output_prefix_for_key(output_prefix, k), dtype=dtype,
                                 extra_meta=dict(meta, json_key=k))
        for k in keys
    }
    for b in builders.values():  # temporaries of a killed earlier run into this prefix (dead pid)
        if b.removed_stale:
            log(f"removed {len(b.removed_stale)} temporary files a killed earlier run into {b.path_prefix} left: "
                + ", ".join(os.path.basename(p) for p in b.removed_stale))
    stats = {"documents": 0, "tokens": 0, "bytes": 0, "bad_lines": [], "empty_documents": 0}
    t0 = time.perf_counter()
    next_log = [log_interval]

    def consume(res: dict):
        for k, (toks, lengths) in res["data"].items():
            builders[k].add_documents(toks, lengths)
            stats["documents"] += int(lengths.size)
            stats["tokens"] += int(toks.size)
        stats["bytes"] += res["bytes"]
        stats["bad_lines"].extend(res["bad"])
        stats["empty_documents"] += res["empty"]
        if log_interval > 0 and stats["documents"] >= next_log[0]:
            el = max(time.perf_counter() - t0, 1e-9)
            log(
                f"Processed {stats['documents']} documents "
                f"({stats['documents'] / el:.1f} docs/s, {stats['tokens'] / el:.0f} tokens/s, "
                f"{stats['bytes'] / el / 1e6:.2f} MB/s)."
            )
            next_log[0] = (stats["documents"] // log_interval + 1) * log_interval

    chunks = iter_chunks(files, input_format, document_boundary, chunk_bytes)
    pool = None
    try:
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        pool = ctx.Pool(
            workers,
            initializer=_init_worker,
            initargs=(tok_args, keys, append_eod, skip_bad_lines, dtype.str),
        )
        window = 2 * workers + 2
        pending: collections.deque = collections.deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_in_worker, (chunk,)))
            while len(pending) >= window:
                consume(pending.popleft().get())
        while pending:
            consume(pending.popleft().get())
        pool.close()
        pool.join()
        pool = None
        if stats["documents"] == 0:
            raise BadInputError(
                f"empty input: no documents found in --input {', '.join(files)}"
                + (f" ({len(stats['bad_lines'])} bad lines skipped)" if stats["bad_lines"] else "")
            )
        for b in builders.values():
            b.finalize()
    except BaseException:
        if pool is not None:
            pool.terminate()
            pool.join()
        for b in builders.values():
            if not b._closed:
                b.abort()
        raise
    elapsed = max(time.perf_counter() - t0, 1e-9)
    stats.update(
        elapsed=elapsed,
        outputs=[output_prefix_for_key(output_prefix, k) for k in keys],
        dtype=dtype.name,
        vocab_size=tokenizer.vocab_size,
    )
    log(
        f"Done: {stats['documents']} documents, {stats['tokens']} tokens, "
        f"{stats['bytes'] / 1e6:.2f} MB in {elapsed:.2f} s "
        f"({stats['documents'] / elapsed:.1f} docs/s, {stats['tokens'] / elapsed:.0f} tokens/s, "
        f"{stats['bytes'] / elapsed / 1e6:.2f} MB/s); {dtype.name} tokens -> "
        + ", ".join(p + ".bin/.idx" for p in stats["outputs"])
    )
    if stats["bad_lines"]:
        shown = stats["bad_lines"][:5]
        log(f"Skipped {len(stats['bad_lines'])} bad lines (--skip-bad-lines):")
        for m in shown:
            log("  " + m)
        if len(stats["bad_lines"]) > len(shown):
            log(f"  ... and {len(stats['bad_lines']) - len(shown)} more")
    if stats["empty_documents"]:
        log(f"Skipped {stats['empty_documents']} empty documents.")
    return stats
