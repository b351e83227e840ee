"""A deterministic synthetic multi-domain text corpus with known learnability.

Domains, in order:
- arith: short arithmetic facts ("12 + 7 = 19."); a tiny model learns the format fast.
- prose: templated English-like sentences with some variety; learnable.
- noise: uniformly random printable characters; unlearnable (loss floor ln 95 per byte).
- dupes: a handful of documents repeated many times; memorised quickly.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

__all__ = ["DOMAINS", "write_synthetic_corpus"]

DOMAINS = ("arith", "prose", "noise", "dupes")
# Validation gets a tenth of the training documents (at least a few), drawn from the same generator.
_VAL_FRACTION = 10
_MIN_VAL_DOCS = 8
_NUM_DUPES = 5

_SUBJECTS = (
    "the cat",
    "a farmer",
    "the old sailor",
    "my neighbour",
    "the river",
    "a small bird",
    "the teacher",
    "our village",
    "the baker",
    "a quiet child",
    "the engineer",
    "the storm",
)
_VERBS = (
    "watches",
    "follows",
    "remembers",
    "carries",
    "paints",
    "finds",
    "builds",
    "hears",
    "visits",
    "opens",
    "counts",
    "forgets",
)
_OBJECTS = (
    "the bright lamp",
    "a wooden boat",
    "the long road",
    "an empty house",
    "the green hill",
    "a heavy box",
    "the morning train",
    "a red apple",
    "the distant bell",
    "an old map",
)
_ENDINGS = (
    "every morning",
    "after the rain",
    "near the market",
    "before dinner",
    "in the winter",
    "without a word",
    "at the end of the day",
    "with great care",
)
_CONNECTORS = ("Then", "Later", "Meanwhile", "Afterwards", "Still")


def _arith_doc(rng: random.Random) -> str:
    """A few arithmetic facts on small numbers."""
    facts = []
    for _ in range(rng.randint(4, 10)):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        op = rng.choice("+-*")
        value = a + b if op == "+" else a - b if op == "-" else a * b
        facts.append(f"{a} {op} {b} = {value}.")
    return " ".join(facts)


def _sentence(rng: random.Random) -> str:
    """One templated sentence."""
    subject = rng.choice(_SUBJECTS)
    text = f"{subject} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_ENDINGS)}"
    return text[0].upper() + text[1:] + "."


def _prose_doc(rng: random.Random) -> str:
    """A short paragraph of templated sentences, some joined with connectors."""
    parts = [_sentence(rng)]
    for _ in range(rng.randint(2, 6)):
        sentence = _sentence(rng)
        if rng.random() < 0.4:
            sentence = f"{rng.choice(_CONNECTORS)}, {sentence[0].lower()}{sentence[1:]}"
        parts.append(sentence)
    return " ".join(parts)


def _noise_doc(rng: random.Random) -> str:
    """Uniformly random printable ASCII: nothing to learn beyond the character set."""
    return "".join(chr(rng.randint(32, 126)) for _ in range(rng.randint(80, 240)))


def _domain_rng(seed: int, domain: str, split: str) -> random.Random:
    """An independent generator per (seed, domain, split); str seeds hash deterministically."""
    return random.Random(f"mixer-corpus:{seed}:{domain}:{split}")


def _generate(domain: str, seed: int, split: str, count: int) -> list[str]:
    """The documents of one domain and split."""
    rng = _domain_rng(seed, domain, split)
    if domain == "dupes":
        # Both splits repeat the same few documents: the domain is pure memorisation.
        base_rng = _domain_rng(seed, domain, "base")
        base = [_prose_doc(base_rng) for _ in range(_NUM_DUPES)]
        return [base[rng.randrange(_NUM_DUPES)] for _ in range(count)]
    makers: dict[str, Callable[[random.Random], str]] = {
        "arith": _arith_doc,
        "prose": _prose_doc,
        "noise": _noise_doc,
    }
    return [makers[domain](rng) for _ in range(count)]


def _write_jsonl(path: Path, texts: list[str]) -> None:
    """One {"text": ...} object per line."""
    with path.open("w", encoding="utf-8") as fh:
        for text in texts:
            fh.write(json.dumps({"text": text}) + "\n")


def write_synthetic_corpus(out_dir: Path, seed: int = 0, docs_per_domain: int = 400) -> list[str]:
    """Write <out_dir>/<domain>/{train,val}.jsonl for every domain; returns the domain names."""
    if docs_per_domain <= 0:
        raise ValueError(f"docs_per_domain must be positive, got {docs_per_domain}")
    out_dir = Path(out_dir)
    num_val = max(_MIN_VAL_DOCS, docs_per_domain // _VAL_FRACTION)
    for domain in DOMAINS:
        folder = out_dir / domain
        folder.mkdir(parents=True, exist_ok=True)
        _write_jsonl(folder / "train.jsonl", _generate(domain, seed, "train", docs_per_domain))
        _write_jsonl(folder / "val.jsonl", _generate(domain, seed, "val", num_val))
    return list(DOMAINS)
