"""The corpus of `mixer bench quality` (and of the agent's trajectory collection): the bundled
minipile, the unlearnable noise domains that can be added to it, and the prepared indexed datasets,
cached by the corpus's fingerprint so that every run of a benchmark, and the next benchmark, reads
the same prepared files.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "NOISE_ALPHABET",
    "TOPICS_K",
    "PreparedCorpus",
    "default_corpus",
    "noise_corpus",
    "prepare",
    "prepare_corpora",
    "train_tokens",
]

NOISE_ALPHABET = "".join(chr(c) for c in range(32, 127))  # printable ASCII: ln 95 = 4.55 nats/byte at best
# ToReMi's topics: TF-IDF + k-means over every domain of the run (ours: fast, offline, deterministic).
TOPICS_K = 16


def default_corpus() -> Path:
    """minipile, shipped with the package (mixer/bench/minipile: 8 domains, 7.7 MB; README.md there)."""
    return Path(__file__).resolve().parent / "minipile"


def noise_corpus(root: Path, count: int, train_bytes: int, val_bytes: int, doc_bytes: int = 2048) -> Path:
    """`count` unlearnable control domains under root (noise-0, noise-1, ...): documents of printable
    ASCII drawn uniformly at random, a fixed seed per domain. The best any model can do on them is
    ln 95 = 4.55 nats/byte, so every step spent on them is wasted; a strategy that sees this should
    starve them. They train but are left out of the score. Written once; reused while present."""
    for i in range(count):
        d = root / f"noise-{i}"
        if (d / "val.jsonl").is_file():
            continue
        d.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(10_000 + i)
        alphabet = np.frombuffer(NOISE_ALPHABET.encode(), dtype=np.uint8)
        for split, size in (("train", train_bytes), ("val", val_bytes)):
            tmp = d / f"{split}.jsonl.tmp"
            with tmp.open("w") as f:
                for _ in range(max(1, size // doc_bytes)):
                    text = alphabet[rng.integers(0, alphabet.size, doc_bytes)].tobytes().decode()
                    f.write(json.dumps({"text": text}) + "\n")
            tmp.rename(d / f"{split}.jsonl")
    return root


def prepare(corpus: Path, cache: Path, progress: bool) -> tuple[Path, dict[str, dict[str, str]]]:
    """prepare_corpus into cache/<corpus fingerprint>/ once; reused while the corpus is unchanged:
    (that folder, the train and val prefixes of each domain)."""
    from mixer.megatron.data import prepare_corpus

    h = hashlib.sha256()
    # Domain folders may be symbolic links (a corpus assembled from another's domains): rglob
    # does not follow them, and every such corpus would share one fingerprint.
    files = sorted(f for d in corpus.iterdir() if d.is_dir() for f in d.glob("*.jsonl*"))
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(corpus)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    root = cache / h.hexdigest()[:16]
    done = root / "prepared.json"
    if done.is_file():
        return root, json.loads(done.read_text())
    shutil.rmtree(root, ignore_errors=True)  # a half-written folder from an interrupted run
    prefixes = prepare_corpus(corpus, root / "data", progress=progress)
    done.write_text(json.dumps(prefixes))
    return root, prefixes


def train_tokens(prefixes: dict[str, dict[str, str]]) -> dict[str, int]:
    """Training tokens per prepared domain (the size of its .bin)."""
    from mixer.megatron.data import TOKEN_DTYPE

    size = np.dtype(TOKEN_DTYPE).itemsize
    return {d: Path(p["train"] + ".bin").stat().st_size // size for d, p in prefixes.items()}


def _with_topics(
    corpora: list[Path], out: Path, cache: Path, progress: bool
) -> tuple[Path, dict[str, dict[str, str]]]:
    """Every domain of the run (the corpus and the noise domains) in one folder of file links,
    prepared and labelled with topics together, so a topic id means the same in every domain."""
    from mixer.topics import TopicsConfig, build_topics

    combined = out / "topics-corpus"
    shutil.rmtree(combined, ignore_errors=True)
    for corpus in corpora:
        for d in sorted(p for p in corpus.iterdir() if p.is_dir() and not p.name.startswith(".")):
            (combined / d.name).mkdir(parents=True)
            for f in d.iterdir():
                if f.is_file():
                    (combined / d.name / f.name).symlink_to(f.resolve())
    root, prefixes = prepare(combined, cache, progress)
    if not (root / "data" / "topics.json").is_file():
        build_topics(combined, root / "data", TopicsConfig(k=TOPICS_K, method="tfidf"))
    return root, prefixes


@dataclass(frozen=True)
class PreparedCorpus:
    """Every domain of one benchmark, prepared."""

    root: Path  # the prepared folder (its index/ holds megatron's sample-index cache)
    prefixes: dict[str, dict[str, str]]  # domain -> {"train": prefix, "val": prefix}
    tokens: dict[str, int]  # training tokens per domain
    control: list[str]  # the noise control domains: trained on, not scored


def prepare_corpora(
    corpus: Path, out: Path, cache: Path, noise_domains: int, topics: bool, progress: bool
) -> PreparedCorpus:
    """Prepare the corpus, and the noise domains (each as large as the median real domain, written
    under out/noise-corpus), and with `topics` the topic-labelled copy of them all that ToReMi reads."""
    root, prefixes = prepare(corpus, cache, progress)
    tokens = train_tokens(prefixes)
    control: list[str] = []
    if noise_domains:
        median = int(np.median(list(tokens.values())))
        _, noise = prepare(
            noise_corpus(out / "noise-corpus", noise_domains, median, 200_000), cache, progress
        )
        control = sorted(noise)
        prefixes = {**prefixes, **noise}
        tokens.update(train_tokens(noise))
    if topics:
        noise_dir = [out / "noise-corpus"] if noise_domains else []
        root, prefixes = _with_topics([Path(corpus), *noise_dir], out, cache, progress)
    return PreparedCorpus(root, prefixes, tokens, control)
