"""Hashed n-gram features of DSIR (Xie et al. 2023, "Data Selection for Language Models via
Importance Resampling", Section 4 "Hashed n-gram features").

A document becomes the list of hash buckets of its unigrams and bigrams; its feature vector is
the bucket counts (a vector in N^m, m = 10,000 buckets in the paper). As in the authors' package
(`data_selection.hashed_ngram_dsir.get_ngram_counts`, version 1.0.3):
- the text is lower-cased and split by NLTK's WordPunctTokenizer, i.e. the regular expression
  `\\w+|[^\\w\\s]+` (Unicode word characters, or runs of other non-space characters);
- a bigram is its two words joined by one space;
- bucket(g) = int(sha256(utf-8(g)), big-endian) mod m.

Chunks (`split_chunks`): the paper selects among equal-size examples, the Pile cut into 128-word
chunks (about 1.7 billion of them); the authors cut them before DSIR, outside the package
(`preprocessing/reformat_and_chunk_data.py` of p-lambda/dsir, CHUNK_LENGTH = 128): the words are
the pieces of the text between single spaces (`text.split(" ")`, so a newline does not separate
two words), and a chunk is up to N consecutive pieces joined by one space. We cut the same way, so
a chunk is a contiguous piece of its document and the chunks joined by spaces give it back.

Ours: bucket ids are memoised per hasher (sha256 of every n-gram dominates the cost otherwise;
the memo is cleared when it holds `max_cache` n-grams, so memory stays bounded). No I/O.
"""

from __future__ import annotations

import hashlib
import itertools
import re

import numpy as np

__all__ = ["MAX_CHUNK_WORDS", "NUM_BUCKETS", "NgramHasher", "split_chunks", "tokenize"]

NUM_BUCKETS = 10_000
"""The paper's number of hash buckets."""
MAX_BUCKETS = 1 << 24
MAX_CACHE = 1 << 20
"""Memoised n-grams per hasher (about 150 MB at most; usually far less)."""

MAX_CHUNK_WORDS = 1 << 20
"""The longest chunk, in words (0: documents are not cut)."""

# NLTK's WordPunctTokenizer compiles this pattern with UNICODE | MULTILINE | DOTALL.
_WORD_PUNCT = re.compile(r"\w+|[^\w\s]+", re.UNICODE | re.MULTILINE | re.DOTALL)


def tokenize(text: str) -> list[str]:
    """The paper's words of a document: lower-cased WordPunct tokens."""
    return _WORD_PUNCT.findall(text.lower())


def split_chunks(text: str, chunk_words: int) -> list[str]:
    """The text cut into chunks of `chunk_words` space-separated words (the last may be shorter),
    as the paper's authors cut the Pile; 0: the whole text, uncut."""
    if chunk_words == 0:
        return [text]
    words = text.split(" ")
    return [" ".join(words[i : i + chunk_words]) for i in range(0, len(words), chunk_words)]


class NgramHasher:
    """Unigram + bigram hash buckets of documents, with a bounded memo of n-gram -> bucket."""

    __slots__ = ("_cache", "max_cache", "num_buckets")

    def __init__(self, num_buckets: int = NUM_BUCKETS, max_cache: int = MAX_CACHE):
        if (
            isinstance(num_buckets, bool)
            or not isinstance(num_buckets, int)
            or not 1 <= num_buckets <= MAX_BUCKETS
        ):
            raise ValueError(f"num_buckets must be an integer in [1, {MAX_BUCKETS}], got {num_buckets!r}")
        if isinstance(max_cache, bool) or not isinstance(max_cache, int) or max_cache < 0:
            raise ValueError(f"max_cache must be a non-negative integer, got {max_cache!r}")
        self.num_buckets = num_buckets
        self.max_cache = max_cache
        self._cache: dict[str, int] = {}

    def bucket(self, ngram: str) -> int:
        """The hash bucket of one n-gram (unigram, or two words joined by a space)."""
        return int.from_bytes(hashlib.sha256(ngram.encode("utf-8")).digest(), "big") % self.num_buckets

    def buckets(self, text: str) -> tuple[np.ndarray, int]:
        """(bucket of every unigram then every bigram, as int64; number of words) of one document."""
        words = tokenize(text)
        grams = words + [f"{a} {b}" for a, b in itertools.pairwise(words)]
        ids = list(map(self._cache.get, grams))
        if None in ids:
            self._fill(grams, ids)
        return np.fromiter(ids, dtype=np.int64, count=len(ids)), len(words)

    def _fill(self, grams: list[str], ids: list[int | None]) -> None:
        """Hash the n-grams the memo does not hold, and remember them."""
        cache = self._cache
        for i, b in enumerate(ids):
            if b is None:
                g = grams[i]
                b = cache.get(g)
                if b is None:
                    b = self.bucket(g)
                    if len(cache) >= self.max_cache:
                        cache.clear()
                    if self.max_cache:
                        cache[g] = b
                ids[i] = b

    def counts(self, text: str) -> np.ndarray:
        """The document's feature vector: bucket counts (int64, length num_buckets)."""
        ids, _ = self.buckets(text)
        return np.bincount(ids, minlength=self.num_buckets)
