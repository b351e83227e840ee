"""Importance weights, Gumbel top-k resampling and the KL-reduction metric of DSIR
(Xie et al. 2023, "Data Selection for Language Models via Importance Resampling").

With z the hashed n-gram counts of a document (mixer.select.features):
- Bag-of-ngrams models (Section 4): the target's and the raw data's feature distributions are
  multinomials over buckets, gamma = sum_i z_i / sum_i 1^T z_i, fitted on every target document
  and every raw document.
- Importance weight (Section 3, w_i = p_feat(z_i) / q_feat(z_i)): under the two multinomials,
  log w_i = sum_j z_ij (log gamma_target_j - log gamma_raw_j). As in the authors' package, each
  log probability is taken of gamma + 1e-8 (`EPS`), so buckets one side never saw stay finite.
- Resampling (Section 3, "resample k examples without replacement"): the k largest
  log w_i + G_i with G_i i.i.d. standard Gumbel (the Gumbel top-k trick, as the authors' package
  does it). Top-k of a union is the top-k of the union of each part's top-k, so shards select
  their own candidates and the driver merges them; ties keep the earlier document. Ours, so that
  nothing holds a corpus's keys: a shard keeps its running top-k over chunks of documents
  (`RunningTopK`), and the driver never gathers the candidates: it bisects for the k-th largest
  key over every shard's sorted candidates (`take_counts`, reading O(log n) entries per shard and
  probe) and tells each shard how many of its leading candidates are chosen. Both give exactly
  the documents of one Gumbel top-k over the whole corpus in order (key descending, then position).
- KL reduction (Section 4, "KL reduction on hashed n-grams"): for a target feature distribution
  p, the raw distribution q (what random selection draws from) and the selected data's empirical
  feature distribution p', KL(p || q) - KL(p || p'). Ours: the same 1e-8 smoothing inside the
  logarithms (KL(p || p') is infinite as soon as one target bucket is absent from the selection),
  and a single target. A selection of few documents is sparse, which alone raises KL(p || p');
  a random selection of the same size is just as sparse, so the driver also reports
  KL(p || random sample) - KL(p || p').
- Prior: the importance mass of a raw domain, sum_i w_i over its documents, normalised over
  domains (ours: a domain-level summary of the same weights, used as a job spec's prior).

Pure: numpy in, numpy out, randomness passed in as arrays or generators.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "EPS",
    "RunningTopK",
    "bag_of_ngrams",
    "domain_prior",
    "gumbel_top_k",
    "kl_divergence",
    "kl_reduction",
    "log_importance_weights",
    "log_ratio",
    "logsumexp",
    "take_counts",
]

EPS = 1e-8
"""Added to every bucket probability before its logarithm (the authors' choice)."""


def bag_of_ngrams(counts: np.ndarray, what: str = "counts") -> np.ndarray:
    """The multinomial over buckets fitted to summed counts (float64, sums to 1)."""
    counts = np.asarray(counts)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(f"{what}: expected a 1-d array of bucket counts, got shape {counts.shape}")
    if not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise ValueError(f"{what}: bucket counts must be finite and non-negative")
    total = float(counts.sum(dtype=np.float64))
    if total <= 0:
        raise ValueError(f"{what}: no n-grams at all (every document is empty after tokenisation)")
    return counts.astype(np.float64) / total


def log_ratio(target_counts: np.ndarray, raw_counts: np.ndarray) -> np.ndarray:
    """log(gamma_target + EPS) - log(gamma_raw + EPS), per bucket."""
    p = bag_of_ngrams(target_counts, "target")
    q = bag_of_ngrams(raw_counts, "raw")
    if p.shape != q.shape:
        raise ValueError(f"target has {p.size} buckets, raw has {q.size}")
    return np.log(p + EPS) - np.log(q + EPS)


def log_importance_weights(bucket_lists: list[np.ndarray], ratio: np.ndarray) -> np.ndarray:
    """log w of each document given the buckets of its n-grams (one array per document)."""
    return np.array([float(ratio[b].sum()) for b in bucket_lists], dtype=np.float64)


def gumbel_top_k(log_w: np.ndarray, k: int, gumbel: np.ndarray | None) -> np.ndarray:
    """Indices of the k largest log_w + gumbel (no noise: plain top-k), largest first, stable."""
    log_w = np.asarray(log_w, dtype=np.float64)
    if not 0 <= k <= log_w.size:
        raise ValueError(f"cannot choose {k} of {log_w.size} documents")
    keys = log_w if gumbel is None else log_w + np.asarray(gumbel, dtype=np.float64)
    return np.argsort(-keys, kind="stable")[:k]


class RunningTopK:
    """The m largest keys fed so far, in chunks of increasing document numbers; ties keep the
    earlier document. Holds at most 2m keys plus one chunk; `result()` equals `gumbel_top_k` over
    the concatenated chunks."""

    __slots__ = ("_idx", "_keys", "_n", "m")

    def __init__(self, m: int):
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ValueError(f"m must be a non-negative integer, got {m!r}")
        self.m = m
        self._keys: list[np.ndarray] = []
        self._idx: list[np.ndarray] = []
        self._n = 0

    def add(self, keys: np.ndarray, idx: np.ndarray) -> None:
        """Feed keys of documents `idx` (all larger than any fed before)."""
        if self.m == 0 or len(keys) == 0:
            return
        self._keys.append(np.asarray(keys, dtype=np.float64))
        self._idx.append(np.asarray(idx, dtype=np.int64))
        self._n += len(keys)
        if self._n > 2 * self.m:
            self._cut()

    def _cut(self) -> None:
        keys, idx = np.concatenate(self._keys), np.concatenate(self._idx)
        order = np.lexsort((idx, -keys))[: self.m]
        self._keys, self._idx, self._n = [keys[order]], [idx[order]], order.size

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys, document numbers) of the top m, largest key first (ties: earlier document first)."""
        if not self._keys:
            return np.empty(0, np.float64), np.empty(0, np.int64)
        self._cut()
        return self._keys[0], self._idx[0]


_SIGN = 1 << 63


def _ordinal(x: float) -> int:
    """A monotone map of finite float64 values onto integers (bisect over floats)."""
    bits = int(np.float64(x).view(np.uint64))
    return bits if bits < _SIGN else -(bits - _SIGN)


def _from_ordinal(o: int) -> float:
    return float(np.uint64(o if o >= 0 else _SIGN - o).view(np.float64))


def take_counts(neg_keys: list[np.ndarray], k: int) -> list[int]:
    """How many leading candidates of each shard the global top-k takes.

    neg_keys[i]: shard i's candidate keys negated, ascending (its candidates ordered by key
    descending, then document; may be memory-mapped: only O(log n) entries per probe are read).
    The global order is key descending, then shard, then document: the order of one stable sort
    of every shard's keys concatenated in shard order, i.e. `gumbel_top_k` over the whole corpus.
    """
    sizes = [len(a) for a in neg_keys]
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= sum(sizes):
        raise ValueError(f"cannot choose {k!r} of {sum(sizes)} candidates")
    if k == 0:
        return [0] * len(neg_keys)
    full = [a for a in neg_keys if len(a)]
    lo, hi = _ordinal(min(a[0] for a in full)), _ordinal(max(a[-1] for a in full))
    while lo < hi:  # the smallest t with at least k negated keys <= t: the k-th largest key
        mid = (lo + hi) // 2
        t = _from_ordinal(mid)
        if sum(int(np.searchsorted(a, t, side="right")) for a in full) >= k:
            hi = mid
        else:
            lo = mid + 1
    t = _from_ordinal(lo)
    below = [int(np.searchsorted(a, t, side="left")) if len(a) else 0 for a in neg_keys]
    at = [int(np.searchsorted(a, t, side="right")) - b if len(a) else 0 for a, b in zip(neg_keys, below)]
    need = k - sum(below)
    counts = []
    for b, e in zip(below, at):
        take = min(e, need)
        counts.append(b + take)
        need -= take
    return counts


def logsumexp(x: np.ndarray) -> float:
    """log sum exp(x); -inf for an empty array."""
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return float("-inf")
    m = float(x.max())
    if not np.isfinite(m):
        return m
    return m + float(np.log(np.exp(x - m).sum()))


def domain_prior(log_mass: dict[str, float]) -> dict[str, float]:
    """Normalised importance mass per domain from each domain's log sum_i w_i."""
    names = list(log_mass)
    lm = np.array([log_mass[n] for n in names], dtype=np.float64)
    if lm.size == 0 or not np.isfinite(lm.max()):
        raise ValueError("no raw document has an importance weight (no eligible documents)")
    w = np.exp(lm - lm.max())
    w /= w.sum()
    return {n: float(v) for n, v in zip(names, w)}


def kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """sum_j p_j (log(p_j + EPS) - log(q_j + EPS)) over buckets with p_j > 0."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    m = p > 0
    return float(np.sum(p[m] * (np.log(p[m] + EPS) - np.log(q[m] + EPS))))


def kl_reduction(
    target_counts: np.ndarray, raw_counts: np.ndarray, selected_counts: np.ndarray
) -> dict[str, float]:
    """KL(target || raw), KL(target || selected) and their difference (the paper's KL reduction)."""
    p = bag_of_ngrams(target_counts, "target")
    to_raw = kl_divergence(p, bag_of_ngrams(raw_counts, "raw"))
    to_sel = kl_divergence(p, bag_of_ngrams(selected_counts, "selected"))
    return {"kl_target_raw": to_raw, "kl_target_selected": to_sel, "kl_reduction": to_raw - to_sel}
