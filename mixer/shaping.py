"""Shaping a strategy's proposal into the weights a version serves: the floor, the cap, the prior.

`shape_weights` normalises a proposal, mixes in the prior (`cadence.prior_smoothing`) and puts
it in the box {min_weight <= w_i <= max_weight, sum 1} as clip(t w, lo, hi) with the one t that
makes the sum 1: domains at the floor or the cap are held there, the others keep their
proportions (our choice of projection, the same for every strategy). `bound_step` limits how far
one version moves from the last (`cadence.max_step_l1`). The engine applies both to every
version; strategies that need the mixture a version will serve call `shape_weights` themselves.
"""

from __future__ import annotations

import math
from itertools import accumulate
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from mixer.spec import CadenceSpec


SHAPE_TOLERANCE = 1e-12
"""Shaped weights sum to 1 and respect floor and cap within this; a move within this of the
`max_step_l1` bound reaches the proposal."""


FLOOR_LOOP_MAX_DOMAINS = 40
"""Up to this many domains the floor-only projection runs on Python floats (three numpy calls
instead of twenty; about twice as fast at K = 22), above it on numpy vectors (faster from about 45
domains). Both paths do the same float operations in the same order: the same bits either way."""

_INF = float("inf")


def shape_weights(w: np.ndarray, prior: np.ndarray, cadence: CadenceSpec) -> np.ndarray:
    """Normalise, mix in the prior, then project onto {min_weight <= w_i <= max_weight, sum 1}."""
    w = np.asarray(w, dtype=np.float64)
    total = w.sum()
    w = w / total if total > 0 and math.isfinite(total) else prior.copy()
    c = cadence.prior_smoothing
    if c > 0:
        w = (1.0 - c) * w + c * prior
    lo, hi = cadence.min_weight, cadence.max_weight
    if lo <= 0.0 and hi >= 1.0:
        return w
    if w.size <= FLOOR_LOOP_MAX_DOMAINS:
        values = w.tolist()  # finite here (else the sum was not): Python's min and max are numpy's
        least, most = min(values), max(values)
    else:
        least, most = w.min(), w.max()
    if lo <= least and most <= hi:
        return w
    if hi * w.size <= 1.0 or lo * w.size >= 1.0:
        # A cap of 1/K or a floor of 1/K (the limits the spec allows) leaves one mixture: uniform.
        return np.full(w.size, hi if hi * w.size <= 1.0 else lo)
    if hi >= 1.0:
        return _floored_simplex(w, lo)
    return _box_simplex(w, lo, hi)


def bound_step(prev: np.ndarray, target: np.ndarray, max_l1: float | None) -> np.ndarray:
    """The weights `max_l1` (L1 distance) from `prev` toward `target`, or `target` itself if it
    is within that distance (plus SHAPE_TOLERANCE, for rounding) or no bound is set.

    The result is prev + t (target - prev) with the one t in [0, 1] that makes the L1 distance
    exactly `max_l1`: a point on the segment between two mixtures, so it lies on the simplex and
    within any floor and cap both of them respect (the final clip only removes rounding). The
    direction is the proposal's: the bound slows a move down, it never changes where it goes."""
    target = np.asarray(target, dtype=np.float64)
    if max_l1 is None:
        return target
    prev = np.asarray(prev, dtype=np.float64)
    diff = target - prev
    dist = float(np.abs(diff).sum())
    if dist <= max_l1 + SHAPE_TOLERANCE:  # not one more version for what is left by rounding
        return target
    out = prev + (max_l1 / dist) * diff
    lo = np.minimum(prev, target)
    hi = np.maximum(prev, target)
    return np.clip(out, lo, hi)


def _floored_simplex(w: np.ndarray, lo: float) -> np.ndarray:
    """The floor-only case of _box_simplex (no cap): the b smallest domains sit at the floor, the
    rest keep their proportions. b is the first count whose smallest free domain clears the floor,
    with t_b = (1 - b lo) / (sum of the domains above b), summed from the largest down."""
    if w.size <= FLOOR_LOOP_MAX_DOMAINS:
        return _floored_simplex_loop(w, lo)
    return _floored_simplex_vector(w, lo)


def _floored_simplex_loop(w: np.ndarray, lo: float) -> np.ndarray:
    """_floored_simplex in scalar floats: the same operations, in the same order, as
    _floored_simplex_vector, so the same bits (a test holds them to that)."""
    values = w.tolist()
    order = sorted(range(len(values)), key=values.__getitem__)  # stable, as argsort(kind="stable")
    ws = [values[i] for i in order]
    rest = list(accumulate(reversed(ws)))  # np.cumsum over the descending order: one running sum
    rest.reverse()
    nb = len(ws)
    for b, (r, x) in enumerate(zip(rest, ws)):
        if (1.0 - b * lo) / (r if r > 0 else _INF) * x >= lo:
            nb = b
            break
    out = [lo] * len(values)
    if nb < len(ws):
        # numpy's sum of the free domains in ascending order (pairwise above 8 terms), as the vector path takes it
        total = ws[nb] if nb == len(ws) - 1 else float(np.array(ws[nb:]).sum())
        scale = (1.0 - lo * nb) / total
        for i in order[nb:]:
            out[i] = values[i] * scale
    return np.array(out)


def _floored_simplex_vector(w: np.ndarray, lo: float) -> np.ndarray:
    """_floored_simplex in vector operations (many domains)."""
    order = np.argsort(w, kind="stable")
    ws = w[order]
    rest = np.cumsum(ws[::-1])[::-1]  # rest[b] = sum of ws[b:]
    t = (1.0 - np.arange(w.size) * lo) / np.where(rest > 0, rest, np.inf)
    clears = t * ws >= lo
    # the first b whose smallest free domain clears the floor
    nb = int(np.argmax(clears)) if clears.any() else w.size
    out = np.full(w.size, lo)
    free = order[nb:]
    if free.size:
        out[free] = w[free] * ((1.0 - lo * nb) / w[free].sum())
    return out


def _box_simplex(w: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """The weights clip(t * w, lo, hi) whose sum is 1: the largest domains hit the cap, the
    smallest the floor, and the rest keep their proportions. Exact, O(K log K).

    The fast path's prefix sums lose precision when weights span many orders of magnitude
    and the cap is close to 1/K; where its result misses the sum or the box, the same
    projection is found by a search that evaluates the sum directly (what it returned
    elsewhere is unchanged, so stored versions still replay bit for bit)."""
    out = _box_simplex_prefix(w, lo, hi)
    tol = SHAPE_TOLERANCE
    if abs(out.sum() - 1.0) <= tol and out.min() >= lo - tol and out.max() <= hi + tol:
        return out
    return _box_simplex_search(w, lo, hi)


def _box_simplex_search(w: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """_box_simplex by bisection over the breakpoints, each sum evaluated directly: O(K log K)."""
    pos = w > 0
    n_zero = int((~pos).sum())
    if hi * int(pos.sum()) + lo * n_zero < 1.0:
        w = w + 1.0 / w.size  # too few positive weights to reach 1 under the cap: spread the rest
        pos = w > 0
    wp = w[pos]
    cands = np.unique(np.concatenate([lo / wp, hi / wp]))

    def total(t: float) -> float:
        return float(np.clip(t * w, lo, hi).sum())

    a, b = 0, cands.size - 1  # the first candidate whose sum reaches 1 (the last one does: all capped)
    while a < b:
        m = (a + b) // 2
        if total(cands[m]) >= 1.0:
            b = m
        else:
            a = m + 1
    right = cands[a]
    left = cands[a - 1] if a > 0 else 0.0
    mid = left + (right - left) / 2.0
    floor = mid * w <= lo
    cap = mid * w >= hi
    free = ~floor & ~cap
    s = w[free].sum()
    t = (1.0 - lo * floor.sum() - hi * cap.sum()) / s if s > 0 else right
    out = np.clip(min(max(t, left), right) * w, lo, hi)  # rounding cannot take t out of its interval
    free = (out > lo) & (out < hi)
    if free.any():
        out[free] = w[free] * ((1.0 - out[~free].sum()) / w[free].sum())
    return out


def _box_simplex_prefix(w: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """_box_simplex from prefix sums over the sorted weights (the fast path)."""
    pos = w > 0
    n_zero = int((~pos).sum())
    ws = np.sort(w[pos])[::-1]
    if hi * ws.size + lo * n_zero < 1.0:
        # Too few positive weights to reach 1 under the cap: spread the rest uniformly.
        return _box_simplex(w + 1.0 / w.size, lo, hi)
    A, B = lo / ws, hi / ws  # t where a domain leaves the floor, and where it reaches the cap
    P = np.zeros(ws.size + 1)
    np.cumsum(ws, out=P[1:])

    def f(t):
        ia = np.searchsorted(A, t, "right") if lo > 0 else np.full(np.shape(t), ws.size)
        ib = np.searchsorted(B, t, "left")
        return lo * (ws.size - ia + n_zero) + hi * ib, P[ia] - P[ib]

    cands = np.sort(np.concatenate([A, B]))
    const, slope = f(cands)
    j = int(np.argmax(const + cands * slope >= 1.0))
    left = cands[j - 1] if j > 0 else 0.0
    mid = (left + cands[j]) / 2.0
    c, s = f(mid)
    t = (1.0 - c) / s if s > 0 else cands[j]
    out = np.where(pos, np.clip(t * w, lo, hi), lo)
    # Recompute the free domains from their own sum: the prefix sums above lose precision.
    free = pos & (out > lo) & (out < hi)
    if free.any():
        out[free] = w[free] * ((1.0 - out[~free].sum()) / w[free].sum())
    return out
