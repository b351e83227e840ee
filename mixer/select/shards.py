"""Reading JSONL corpora in shards, and the three per-shard tasks of DSIR selection (fit, score, write).

A shard is a byte range of a plain `.jsonl` file (lines belong to the shard they start in) or a
whole `.jsonl.gz` file (gzip cannot seek). Documents are the non-blank lines, each a JSON object
with a string "text" field, numbered from 0 within the shard; the driver turns shard-local numbers
into per-domain numbers with the shards' document counts. Each task reads its shard once, line
by line, and returns small arrays (bucket counts) or writes its top-k candidates to files beside
the output, never the documents, so no process holds a corpus (or its keys) in memory. The task
functions are plain functions: the driver runs them in this process or as Ray tasks.
"""

from __future__ import annotations

import functools
import gzip
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mixer.select.features import NgramHasher
from mixer.select.importance import RunningTopK, logsumexp

__all__ = [
    "CHUNK_DOCS",
    "STREAMS",
    "SelectError",
    "Shard",
    "candidate_files",
    "fit_shard",
    "iter_docs",
    "make_shards",
    "score_shard",
    "write_shard",
]


@functools.lru_cache(maxsize=2)
def _hasher(num_buckets: int) -> NgramHasher:
    """One hasher per process and bucket count: its memo carries over from task to task (a Ray
    worker runs many), so the scoring pass mostly finds the n-grams the fitting pass hashed."""
    return NgramHasher(num_buckets)


class SelectError(ValueError):
    """Data selection input or settings are invalid; the message names what was wrong."""


@dataclass(frozen=True, slots=True)
class Shard:
    """Lines of `path` that start in [start, end) (end -1: to the end of the file)."""

    domain: str
    path: str
    start: int
    end: int
    ordinal: int
    """Position among all raw shards (seeds the shard's random streams)."""

    @property
    def gzipped(self) -> bool:
        return self.path.endswith(".gz")


def make_shards(domain: str, path: Path, shard_bytes: int, first_ordinal: int) -> list[Shard]:
    """Split one file into shards of about shard_bytes (a gzipped file is one shard)."""
    size = path.stat().st_size
    if path.name.endswith(".gz") or size <= shard_bytes:
        return [Shard(domain, str(path), 0, -1, first_ordinal)]
    bounds = list(range(0, size, shard_bytes)) + [size]
    return [
        Shard(domain, str(path), a, b if b < size else -1, first_ordinal + i)
        for i, (a, b) in enumerate(itertools.pairwise(bounds))
    ]


def _lines(shard: Shard) -> Iterator[tuple[bytes, str]]:
    """(raw line, where) for every line of the shard, where = "path:line" or "path@byte"."""
    if shard.gzipped:
        with gzip.open(shard.path, "rb") as fh:
            for lineno, line in enumerate(fh, 1):
                yield line, f"{shard.path}:{lineno}"
        return
    with open(shard.path, "rb") as fh:
        pos = shard.start
        if pos > 0:
            # The line holding byte start-1 belongs to the previous shard.
            fh.seek(pos - 1)
            pos += len(fh.readline()) - 1
        lineno = 0
        while shard.end < 0 or pos < shard.end:
            line = fh.readline()
            if not line:
                return
            lineno += 1
            where = f"{shard.path}:{lineno}" if shard.start == 0 else f"{shard.path}@byte {pos}"
            yield line, where
            pos += len(line)


def iter_docs(shard: Shard) -> Iterator[tuple[str, bytes]]:
    """(text, raw line) of every document in the shard, with errors naming file and line."""
    lines = _lines(shard)
    while True:
        try:
            line, where = next(lines)
        except StopIteration:
            return
        except (OSError, EOFError) as exc:
            raise SelectError(f"{shard.path}: cannot read ({exc})") from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except UnicodeDecodeError:
            raise SelectError(f"{where}: not UTF-8 text") from None
        except json.JSONDecodeError as exc:
            raise SelectError(f"{where}: invalid JSON ({exc.msg})") from None
        if not isinstance(obj, dict) or "text" not in obj:
            raise SelectError(f'{where}: missing "text" field')
        if not isinstance(obj["text"], str):
            raise SelectError(f'{where}: "text" must be a string, got {type(obj["text"]).__name__}')
        yield obj["text"], line


def fit_shard(shard: Shard, num_buckets: int, min_words: int) -> dict:
    """Pass 1: summed bucket counts of the shard, its documents, eligible documents and bytes."""
    hasher = _hasher(num_buckets)
    counts = np.zeros(num_buckets, dtype=np.int64)
    docs = eligible = nbytes = 0
    for text, line in iter_docs(shard):
        ids, words = hasher.buckets(text)
        counts += np.bincount(ids, minlength=num_buckets)
        docs += 1
        eligible += words >= min_words
        nbytes += len(line)
    return {"counts": counts, "docs": docs, "eligible": int(eligible), "bytes": nbytes}


CHUNK_DOCS = 1 << 16
"""Eligible documents scored at once in pass 2 (the most log weights a task holds beside its top-k)."""
STREAMS = ("dsir", "random")
"""The two draws of pass 2: DSIR (log w + Gumbel) and the random baseline (Gumbel alone)."""


def candidate_files(stem: str, stream: str) -> tuple[str, str]:
    """(negated keys, document numbers) files of one shard's candidates for one stream."""
    return f"{stem}.{stream}.keys.npy", f"{stem}.{stream}.ids.npy"


def _log_weight_chunks(
    shard: Shard, ratio: np.ndarray, min_words: int, chunk_docs: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(log w, shard-local document numbers) of the shard's eligible documents, chunk by chunk."""
    hasher = _hasher(ratio.size)
    log_w: list[float] = []
    index: list[int] = []
    for i, (text, _) in enumerate(iter_docs(shard)):
        ids, words = hasher.buckets(text)
        if words >= min_words:
            log_w.append(float(ratio[ids].sum()))
            index.append(i)
            if len(log_w) == chunk_docs:
                yield np.array(log_w, dtype=np.float64), np.array(index, dtype=np.int64)
                log_w, index = [], []
    if log_w:
        yield np.array(log_w, dtype=np.float64), np.array(index, dtype=np.int64)


def score_shard(
    shard: Shard,
    ratio: np.ndarray,
    min_words: int,
    k: int,
    seed: int,
    stem: str,
    chunk_docs: int = CHUNK_DOCS,
) -> dict:
    """Pass 2: log importance weights of the shard's eligible documents, and its top-k candidates.

    Streams the shard in chunks of `chunk_docs` eligible documents. The candidates of DSIR
    (log w + Gumbel) and of the random baseline (Gumbel alone) are written to
    `candidate_files(stem, stream)`: negated keys ascending, and the matching shard-local document
    numbers. Each stream's Gumbel noise is one generator seeded by (seed, shard ordinal, stream),
    drawn chunk after chunk (the same numbers as one draw over the shard). Returns the number of
    eligible documents, log sum_i w_i over them, and each stream's candidate count.
    """
    rngs = [np.random.default_rng([seed, shard.ordinal, s]) for s in range(len(STREAMS))]
    tops = [RunningTopK(k) for _ in STREAMS]
    log_mass, eligible = float("-inf"), 0
    for lw, idx in _log_weight_chunks(shard, ratio, min_words, chunk_docs):
        tops[0].add(lw + rngs[0].gumbel(size=lw.size), idx)
        tops[1].add(rngs[1].gumbel(size=lw.size), idx)
        log_mass = float(np.logaddexp(log_mass, logsumexp(lw)))
        eligible += lw.size
    out: dict = {"eligible": eligible, "log_mass": log_mass}
    for name, top in zip(STREAMS, tops):
        keys, idx = top.result()
        kfile, ifile = candidate_files(stem, name)
        np.save(kfile, -keys)
        np.save(ifile, idx)
        out[name] = int(keys.size)
    return out


def write_shard(shard: Shard, stem: str, takes: tuple[int, int], part: str, num_buckets: int) -> dict:
    """Write the chosen documents' lines to `part` (gzip when the source is), as they were read.

    The chosen documents are the first takes[0] DSIR candidates in `stem`'s files, the random
    baseline's the first takes[1] random ones. Also returns the bucket counts of both choices.
    """
    chosen_set, baseline_set = (
        set(np.load(candidate_files(stem, name)[1], mmap_mode="r")[:n].tolist())
        for name, n in zip(STREAMS, takes)
    )
    hasher = _hasher(num_buckets)
    sel = np.zeros(num_buckets, dtype=np.int64)
    rnd = np.zeros(num_buckets, dtype=np.int64)
    written = nbytes = 0
    opener = gzip.open if shard.gzipped else open
    with opener(part, "wb") as out:
        for i, (text, line) in enumerate(iter_docs(shard)):
            if i in chosen_set:
                out.write(line.rstrip(b"\r\n") + b"\n")
                sel += hasher.counts(text)
                written += 1
                nbytes += len(line)
            if i in baseline_set:
                rnd += hasher.counts(text)
    return {"selected_counts": sel, "random_counts": rnd, "written": written, "bytes": nbytes}
