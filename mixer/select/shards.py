"""Reading JSONL corpora in shards, and the three per-shard tasks of DSIR selection (fit, score, write).

A shard is a byte range of a plain `.jsonl` file (lines belong to the shard they start in) or a
whole `.jsonl.gz` file (gzip cannot seek). Documents are the non-blank lines, each a JSON object
with a string "text" field, numbered from 0 within the shard; the driver turns shard-local numbers
into per-domain numbers with the shards' document counts. What is scored and chosen is a unit:
a whole document (chunk_words 0), or one of its chunks of chunk_words words
(mixer.select.features.split_chunks), numbered from 0 within the shard, document after document. Each task reads its shard once, line
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

from mixer.select.features import NgramHasher, split_chunks
from mixer.select.importance import RunningTopK, logsumexp

__all__ = [
    "CHUNK_DOCS",
    "STREAMS",
    "SelectError",
    "Shard",
    "candidate_files",
    "chosen_file",
    "fit_shard",
    "iter_docs",
    "make_shards",
    "score_shard",
    "unit_log_weights",
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


def fit_shard(shard: Shard, num_buckets: int, min_words: int, chunk_words: int = 0) -> dict:
    """Pass 1: summed bucket counts of the shard's units, its documents, units, eligible units
    (at least min_words words) and bytes."""
    hasher = _hasher(num_buckets)
    counts = np.zeros(num_buckets, dtype=np.int64)
    docs = units = eligible = nbytes = 0
    for text, line in iter_docs(shard):
        for unit in split_chunks(text, chunk_words):
            ids, words = hasher.buckets(unit)
            counts += np.bincount(ids, minlength=num_buckets)
            units += 1
            eligible += words >= min_words
        docs += 1
        nbytes += len(line)
    return {"counts": counts, "docs": docs, "units": units, "eligible": int(eligible), "bytes": nbytes}


CHUNK_DOCS = 1 << 16
"""Eligible units scored at once in pass 2 (the most log weights a task holds beside its top-k)."""
STREAMS = ("dsir", "random")
"""The two draws of pass 2: DSIR (log w + Gumbel) and the random baseline (Gumbel alone)."""


def candidate_files(stem: str, stream: str) -> tuple[str, str]:
    """(negated keys, unit numbers) files of one shard's candidates for one stream."""
    return f"{stem}.{stream}.keys.npy", f"{stem}.{stream}.ids.npy"


def chosen_file(stem: str) -> str:
    """The (document, chunk) numbers, shard-local, of the units pass 3 wrote, in file order."""
    return f"{stem}.chosen.npy"


def _units(shard: Shard, chunk_words: int) -> Iterator[tuple[int, int, str, bytes]]:
    """(document number, chunk number, unit text, document line) of every unit of the shard."""
    for doc, (text, line) in enumerate(iter_docs(shard)):
        for chunk, unit in enumerate(split_chunks(text, chunk_words)):
            yield doc, chunk, unit, line


def unit_log_weights(
    shard: Shard, ratio: np.ndarray, min_words: int, chunk_words: int = 0, chunk_docs: int = CHUNK_DOCS
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(log w, shard-local unit numbers) of the shard's eligible units, chunk_docs at a time."""
    hasher = _hasher(ratio.size)
    log_w: list[float] = []
    index: list[int] = []
    for u, (_, _, text, _) in enumerate(_units(shard, chunk_words)):
        ids, words = hasher.buckets(text)
        if words >= min_words:
            log_w.append(float(ratio[ids].sum()))
            index.append(u)
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
    chunk_words: int = 0,
    chunk_docs: int = CHUNK_DOCS,
) -> dict:
    """Pass 2: log importance weights of the shard's eligible units, and its top-k candidates.

    Streams the shard `chunk_docs` eligible units at a time. The candidates of DSIR
    (log w + Gumbel) and of the random baseline (Gumbel alone) are written to
    `candidate_files(stem, stream)`: negated keys ascending, and the matching shard-local unit
    numbers. Each stream's Gumbel noise is one generator seeded by (seed, shard ordinal, stream),
    drawn chunk after chunk (the same numbers as one draw over the shard). Returns the number of
    eligible units, log sum_i w_i over them, and each stream's candidate count.
    """
    rngs = [np.random.default_rng([seed, shard.ordinal, s]) for s in range(len(STREAMS))]
    tops = [RunningTopK(k) for _ in STREAMS]
    log_mass, eligible = float("-inf"), 0
    for lw, idx in unit_log_weights(shard, ratio, min_words, chunk_words, chunk_docs):
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


def write_shard(
    shard: Shard, stem: str, takes: tuple[int, int], part: str, num_buckets: int, chunk_words: int = 0
) -> dict:
    """Write the chosen units to `part` (gzip when the source is), one JSON line each.

    The chosen units are the first takes[0] DSIR candidates in `stem`'s files, the random
    baseline's the first takes[1] random ones. A whole document is written as its line was read; a
    chunk as its document's object with "text" replaced by the chunk. The chosen units' (document,
    chunk) numbers go to `chosen_file(stem)`. Also returns the bucket counts of both choices.
    """
    chosen_set, baseline_set = (
        set(np.load(candidate_files(stem, name)[1], mmap_mode="r")[:n].tolist())
        for name, n in zip(STREAMS, takes)
    )
    hasher = _hasher(num_buckets)
    sel = np.zeros(num_buckets, dtype=np.int64)
    rnd = np.zeros(num_buckets, dtype=np.int64)
    chosen: list[tuple[int, int]] = []
    nbytes = 0
    parsed: tuple[int, dict] = (-1, {})  # the current document's object, parsed once for its chunks
    opener = gzip.open if shard.gzipped else open
    with opener(part, "wb") as out:
        for u, (doc, chunk, text, line) in enumerate(_units(shard, chunk_words)):
            if u in chosen_set:
                if chunk_words == 0:
                    out.write(line.rstrip(b"\r\n") + b"\n")
                    nbytes += len(line)
                else:
                    if parsed[0] != doc:
                        parsed = (doc, json.loads(line))
                    row = json.dumps({**parsed[1], "text": text}).encode("ascii")
                    out.write(row + b"\n")
                    nbytes += len(row) + 1
                sel += hasher.counts(text)
                chosen.append((doc, chunk))
            if u in baseline_set:
                rnd += hasher.counts(text)
    np.save(chosen_file(stem), np.array(chosen, dtype=np.int64).reshape(-1, 2))
    return {"selected_counts": sel, "random_counts": rnd, "written": len(chosen), "bytes": nbytes}
