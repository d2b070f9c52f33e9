"""Reading raw corpora: plain-text files, folders and JSON-lines, in byte chunks.

Two input formats (``--input-format``; ``auto`` picks ``jsonl`` for ``.jsonl``/``.json``
files and ``text`` otherwise):

``jsonl``
    one JSON object per line; each ``--json-keys`` key holds the text of one document.
    Blank lines are ignored.

``text``
    ``--document-boundary blank-line`` (default): a document is a block of consecutive
    non-blank lines; one or more blank (whitespace-only) lines separate documents. The
    document's text is its lines joined with ``"\\n"`` (no trailing newline).
    ``--document-boundary file``: each file is one document, its full text unchanged.

The reader streams: files are cut into chunks of about ``chunk_bytes`` that end on a
document boundary, and a chunk is parsed where it is processed (a worker process), so the
main process touches only bytes and memory stays flat in the input size.

Bad input raises :class:`BadInputError` naming ``file:line``; with ``skip_bad_lines`` the
line (or JSON record) is dropped and counted instead.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence

from megatron_tokenformer.errors import TokenformerError

__all__ = [
    "BadInputError",
    "input_paths",
    "Chunk",
    "ParsedChunk",
    "expand_inputs",
    "file_format",
    "iter_chunks",
    "parse_chunk",
    "iter_documents",
]

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".py")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
BOUNDARIES = ("blank-line", "file")


class BadInputError(TokenformerError, ValueError):
    """Input that cannot be used; the message names the file (and line)."""


@dataclass
class Chunk:
    """A piece of one input file ending on a document boundary.

    ``items`` holds ``(first_line_number, bytes)`` pairs: one pair for line-oriented
    formats, one per file for ``--document-boundary file`` (several small files can share
    a chunk, then ``paths`` has one path per item).
    """

    paths: List[str]
    items: List[tuple]
    fmt: str
    boundary: str

    @property
    def num_bytes(self) -> int:
        return sum(len(b) for _, b in self.items)


@dataclass
class ParsedChunk:
    docs: Dict[str, List[str]]
    num_bytes: int
    bad: List[str] = field(default_factory=list)
    empty: int = 0


def expand_inputs(inputs: Sequence[str], flag: str = "--input") -> List[str]:
    """Files named, found under folders (recursively, sorted) or matched by a glob."""
    if isinstance(inputs, str):
        inputs = [inputs]
    files: List[str] = []
    for spec in inputs:
        if os.path.isdir(spec):
            found = []
            for root, dirs, names in os.walk(spec):
                dirs.sort()
                for n in sorted(names):
                    if n.startswith("."):
                        continue
                    if n.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES):
                        found.append(os.path.join(root, n))
            if not found:
                raise BadInputError(
                    f"{flag} {spec}: folder holds no text or JSON-lines files "
                    f"({', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)})"
                )
            files.extend(found)
        elif os.path.isfile(spec):
            files.append(spec)
        elif any(c in spec for c in "*?["):
            matched = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not matched:
                raise BadInputError(f"{flag} {spec}: the pattern matches no file")
            files.extend(matched)
        else:
            raise BadInputError(f"{flag} {spec}: no such file or folder")
    if not files:
        raise BadInputError(f"{flag}: no input files given")
    return files


def input_paths(inputs: Sequence[str]) -> List[str]:
    """The files and folders ``--input`` names (globs expanded; a name that matches nothing is skipped:
    :func:`~.text_inputs.expand_inputs` reports it)."""
    found = []
    for spec in ([inputs] if isinstance(inputs, str) else inputs):
        if os.path.exists(spec):
            found.append(spec)
        elif any(c in spec for c in "*?["):
            found.extend(sorted(glob.glob(spec, recursive=True)))
    return found


def file_format(path: str, fmt: str = "auto") -> str:
    if fmt in ("jsonl", "text"):
        return fmt
    if fmt != "auto":
        raise BadInputError(f"--input-format must be auto, jsonl or text, got {fmt!r}")
    return "jsonl" if path.endswith(JSONL_SUFFIXES) else "text"


def iter_chunks(files: Sequence[str], fmt: str = "auto", boundary: str = "blank-line",
                chunk_bytes: int = 1 << 20) -> Iterator[Chunk]:
    """Cut the input files into chunks of about ``chunk_bytes`` (see the module doc)."""
    if boundary not in BOUNDARIES:
        raise BadInputError(f"--document-boundary must be one of {', '.join(BOUNDARIES)}")
    pending_files: List[tuple] = []
    pending_paths: List[str] = []
    pending_bytes = 0
    for path in files:
        f_fmt = file_format(path, fmt)
        if f_fmt == "text" and boundary == "file":
            with open(path, "rb") as f:
                data = _strip_bom(f.read())
            pending_files.append((1, data))
            pending_paths.append(path)
            pending_bytes += len(data)
            if pending_bytes >= chunk_bytes:
                yield Chunk(pending_paths, pending_files, "text", "file")
                pending_files, pending_paths, pending_bytes = [], [], 0
            continue
        with open(path, "rb") as f:
            line_no = 1
            while True:
                data = f.read(chunk_bytes)
                if not data:
                    break
                if line_no == 1:
                    data = _strip_bom(data)
                if f_fmt == "jsonl":
                    if not data.endswith(b"\n"):
                        data += f.readline()
                else:
                    # extend to the end of a blank line so no document is cut in two
                    if not data.endswith(b"\n"):
                        data += f.readline()
                    while True:
                        line = f.readline()
                        data += line
                        if not line or not line.strip():
                            break
                yield Chunk([path], [(line_no, data)], f_fmt, boundary)
                line_no += data.count(b"\n")
    if pending_files:
        yield Chunk(pending_paths, pending_files, "text", "file")


def _strip_bom(data: bytes) -> bytes:
    return data[3:] if data.startswith(b"\xef\xbb\xbf") else data


def _decode_lines(path: str, first_line: int, data: bytes, skip_bad: bool, bad: List[str]):
    """Decode ``data`` as UTF-8. Returns the text; undecodable lines raise or are dropped."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    out = []
    for i, raw in enumerate(data.split(b"\n")):
        try:
            out.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            msg = (
                f"{path}:{first_line + i}: not valid UTF-8 "
                f"(byte 0x{raw[e.start]:02x} at column {e.start + 1})"
            )
            if not skip_bad:
                raise BadInputError(msg) from None
            bad.append(msg)
            out.append("")  # keeps line numbers; an empty line
    return "\n".join(out)


def _blank_line_documents(text: str) -> List[str]:
    docs, block = [], []
    for line in text.split("\n"):
        if line.strip():
            block.append(line)
        elif block:
            docs.append("\n".join(block))
            block = []
    if block:
        docs.append("\n".join(block))
    return docs


def parse_chunk(chunk: Chunk, json_keys: Sequence[str] = ("text",),
                skip_bad_lines: bool = False) -> ParsedChunk:
    """Turn a chunk's bytes into document texts, one list per JSON key.

    For text input the single key is ``json_keys[0]``.
    """
    keys = list(json_keys)
    docs: Dict[str, List[str]] = {k: [] for k in keys}
    bad: List[str] = []
    empty = 0
    if chunk.fmt == "text":
        key = keys[0]
        for path, (first, data) in zip(chunk.paths, chunk.items):
            text = _decode_lines(path, first, data, skip_bad_lines, bad)
            if chunk.boundary == "file":
                if text.strip():
                    docs[key].append(text)
                else:
                    empty += 1
            else:
                docs[key].extend(_blank_line_documents(text))
        return ParsedChunk(docs, chunk.num_bytes, bad, empty)

    path = chunk.paths[0]
    first, data = chunk.items[0]
    try:
        text = data.decode("utf-8")
        lines = text.split("\n")
        decode_failed = None
    except UnicodeDecodeError:
        lines = data.split(b"\n")
        decode_failed = True
    loads = json.loads
    for i, line in enumerate(lines):
        where = f"{path}:{first + i}"
        if decode_failed:
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as e:
                msg = f"{where}: not valid UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1})"
                if not skip_bad_lines:
                    raise BadInputError(msg) from None
                bad.append(msg)
                continue
        if not line.strip():
            continue
        try:
            obj = loads(line)
        except ValueError as e:
            msg = f"{where}: not valid JSON ({e.msg} at column {e.colno})"
            if not skip_bad_lines:
                raise BadInputError(msg) from None
            bad.append(msg)
            continue
        if not isinstance(obj, dict):
            msg = f"{where}: a JSON line must be an object, got {type(obj).__name__}"
            if not skip_bad_lines:
                raise BadInputError(msg)
            bad.append(msg)
            continue
        missing = [k for k in keys if k not in obj]
        wrong = [k for k in keys if k in obj and not isinstance(obj[k], str)]
        if missing or wrong:
            msg = (
                f"{where}: the JSON object has no key {missing[0]!r} (see --json-keys)"
                if missing
                else f"{where}: the value of {wrong[0]!r} is a {type(obj[wrong[0]]).__name__}, not a string"
            )
            if not skip_bad_lines:
                raise BadInputError(msg)
            bad.append(msg)
            continue
        for k in keys:
            if obj[k]:
                docs[k].append(obj[k])
            else:
                empty += 1
    return ParsedChunk(docs, chunk.num_bytes, bad, empty)


def iter_documents(inputs: Sequence[str], fmt: str = "auto", boundary: str = "blank-line",
                   json_keys: Sequence[str] = ("text",), skip_bad_lines: bool = False,
                   report: Optional[dict] = None) -> Iterator[str]:
    """Every document text of the inputs, in order, one process (tokenizer training, tests).

    ``report`` (a dict) receives ``bad_lines`` (list of messages) and ``documents``.
    """
    files = expand_inputs(inputs)
    if report is not None:
        report.setdefault("bad_lines", [])
        report.setdefault("documents", 0)
    for chunk in iter_chunks(files, fmt, boundary):
        parsed = parse_chunk(chunk, json_keys, skip_bad_lines)
        if report is not None:
            report["bad_lines"].extend(parsed.bad)
        for k in json_keys:
            if report is not None:
                report["documents"] += len(parsed.docs[k])
            yield from parsed.docs[k]
