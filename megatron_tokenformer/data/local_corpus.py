"""A text corpus from files every Python installation has (no download).

Collects the ``.py``, ``.txt``, ``.rst`` and ``.md`` files of the standard library and the
installed packages (``sysconfig`` paths ``stdlib``, ``purelib``, ``platlib``), in sorted
path order, each file one document, until ``max_mb`` megabytes. Deterministic for a given
installation. Used by the quick start to train a tokenizer and a model offline.

Sorted order puts related files next to each other, so a Megatron ``--split`` (contiguous document
ranges) gives a validation set from other packages than the training set. ``shuffle_seed`` writes the
same selection of files in a seeded random order instead: every split then samples the whole corpus.
"""

from __future__ import annotations

import json
import os
import random
import sysconfig
from typing import Iterator, List, Optional, Sequence, Tuple

from megatron_tokenformer.fileio import atomic_path, check_outputs_apart

__all__ = ["default_roots", "iter_corpus_files", "build_local_corpus"]

DEFAULT_EXTENSIONS = (".py", ".txt", ".rst", ".md")
_SKIP_DIRS = {"__pycache__", ".git", "test", "tests", "idlelib", "site-packages", "dist-packages"}


def default_roots() -> List[str]:
    roots = []
    for key in ("stdlib", "purelib", "platlib"):
        p = sysconfig.get_paths().get(key)
        if p and os.path.isdir(p):
            p = os.path.realpath(p)
            if p not in roots:
                roots.append(p)
    return roots


def iter_corpus_files(roots: Sequence[str], extensions: Sequence[str] = DEFAULT_EXTENSIONS,
                      min_bytes: int = 200, max_file_bytes: int = 1 << 20) -> Iterator[Tuple[str, str]]:
    """Yield ``(root, path)`` of candidate files, sorted, each once."""
    seen = set()
    exts = tuple(extensions)
    for root in roots:
        for dirpath, dirs, names in os.walk(root):
            # site-packages under stdlib is its own root; tests are repetitive
            dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
            for n in sorted(names):
                if not n.endswith(exts):
                    continue
                path = os.path.join(dirpath, n)
                real = os.path.realpath(path)
                if real in seen:
                    continue
                seen.add(real)
                try:
                    size = os.path.getsize(path)
                except OSError:
                    continue
                if min_bytes <= size <= max_file_bytes:
                    yield root, path


def build_local_corpus(output: str, max_mb: float = 20.0, fmt: Optional[str] = None,
                       roots: Optional[Sequence[str]] = None,
                       extensions: Sequence[str] = DEFAULT_EXTENSIONS,
                       shuffle_seed: Optional[int] = None) -> dict:
    """Write the corpus to ``output`` (``jsonl``: one {"text", "source"} object per file;
    ``text``: files separated by a blank line... files are joined with "\\n\\n").

    The files are chosen in sorted order up to ``max_mb``; with ``shuffle_seed`` the chosen files are
    written in the order of ``random.Random(shuffle_seed).shuffle`` (same files, same bytes).
    Returns ``{"documents", "bytes", "output"}``. The file appears atomically.
    """
    if max_mb <= 0:
        raise ValueError(f"--max-mb must be > 0, got {max_mb}")
    if fmt is None:
        fmt = "jsonl" if output.endswith((".jsonl", ".json")) else "text"
    if fmt not in ("jsonl", "text"):
        raise ValueError(f"--format must be jsonl or text, got {fmt!r}")
    roots = list(roots) if roots else default_roots()
    for r in roots:
        if not os.path.isdir(r):
            raise ValueError(f"--roots {r}: no such folder")
    check_outputs_apart([("--output", output)], [("--roots", r) for r in roots])  # never written where read
    limit = int(max_mb * 1e6)
    written = 0
    chosen: List[str] = []
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with atomic_path(output) as tmp:
        with open(tmp, "w", encoding="utf-8") as out:
            for root, path in iter_corpus_files(roots, extensions):
                try:
                    with open(path, encoding="utf-8") as f:
                        text = f.read()
                except (UnicodeDecodeError, OSError):
                    continue
                text = text.replace("\r\n", "\n").strip("\n")
                if not text.strip():
                    continue
                if fmt == "jsonl":
                    rel = os.path.relpath(path, root)
                    line = json.dumps({"text": text, "source": rel}, ensure_ascii=False) + "\n"
                else:
                    # blank-line mode would split a file into paragraphs; that is fine for
                    # tokenizer training and LM data alike
                    line = text + "\n\n"
                n = len(line.encode("utf-8"))
                if written + n > limit:
                    if not chosen:
                        continue
                    break
                chosen.append(line)
                written += n
            if not chosen:
                raise ValueError(f"no text files found under {', '.join(roots)}")
            if shuffle_seed is not None:
                random.Random(shuffle_seed).shuffle(chosen)
            out.writelines(chosen)
    return {"documents": len(chosen), "bytes": written, "output": output}
