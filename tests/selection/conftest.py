"""The stored tiny DSIR inputs (tests/selection/data) and a float64 re-derivation of the method."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


def read_texts(path: Path) -> list[str]:
    return [
        json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]


def domains() -> list[str]:
    return sorted(p.name for p in (DATA / "raw").iterdir() if p.is_dir())


# -- the re-derivation: plain Python, exact integers, math.fsum --------------------------------
# Written from the paper's definitions and the authors' tokeniser, independently of mixer.select.

WORD_PUNCT = r"\w+|[^\w\s]+"


def ngrams(text: str) -> list[str]:
    words = re.findall(WORD_PUNCT, text.lower())
    return words + [words[i] + " " + words[i + 1] for i in range(len(words) - 1)]


def bucket(gram: str, m: int) -> int:
    return int(hashlib.sha256(gram.encode("utf-8")).hexdigest(), 16) % m


def bag(texts: list[str], m: int) -> Counter:
    c: Counter = Counter()
    for t in texts:
        c.update(bucket(g, m) for g in ngrams(t))
    return c


def log_ratio(target: Counter, raw: Counter, m: int) -> list[float]:
    nt, nr = sum(target.values()), sum(raw.values())
    return [math.log(target[j] / nt + 1e-8) - math.log(raw[j] / nr + 1e-8) for j in range(m)]


def log_weight(text: str, ratio: list[float]) -> float:
    m = len(ratio)
    return math.fsum(ratio[bucket(g, m)] for g in ngrams(text))


def kl(p: Counter, q: Counter) -> float:
    np_, nq = sum(p.values()), sum(q.values())
    return math.fsum(
        (c / np_) * (math.log(c / np_ + 1e-8) - math.log(q.get(j, 0) / nq + 1e-8)) for j, c in p.items() if c
    )


@pytest.fixture
def tiny() -> Path:
    return DATA


def authors_chunks(text: str, n: int) -> list[str]:
    """The authors' cut (p-lambda/dsir preprocessing/reformat_and_chunk_data.py, chunk_examples):
    the pieces between single spaces, n at a time, joined by one space."""
    words = text.split(" ")
    return [" ".join(words[i : i + n]) for i in range(0, len(words), n)]
