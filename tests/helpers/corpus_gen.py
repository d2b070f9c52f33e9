"""Generated test corpora for the data pipeline tests (imported by name: no conftest import)."""

import json
import random

WORDS = (
    "the of and to in is was for on that with as by at from his her it an were are which "
    "this be or have had not but what all when there can who been one more would their "
    "tokenformer pattention scaling parameter tokens attention layer model data pipeline "
    "über café naïve 東京 ☃ 3.14159 2024 x=y+1; {key: [value]}"
).split()


def make_documents(n_docs, seed=0, max_lines=4, max_words=14):
    """Random multi-line documents (no blank lines inside, no leading/trailing blanks)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        lines = []
        for _ in range(rng.randint(1, max_lines)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(1, max_words))]
            sep = rng.choice([" ", " ", " ", "  ", "\t"])
            lines.append(sep.join(words) + rng.choice([".", ",", "!", "", " "]))
        docs.append("\n".join(lines).strip())
    return docs


def write_blank_line_text(path, docs, blank="\n"):
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(d + "\n" + blank)


def write_jsonl(path, docs, key="text", extra=None):
    with open(path, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            obj = {key: d}
            if extra:
                obj.update(extra(i))
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
