"""ADO's scaling-law fit, equation (E2) of mixer/strategies/ado.py (Jiang et al. 2024; the authors'
code yidingjiang/ado @ bc3d8d0): per domain, L(n) = eps + beta * n^(-alpha) fitted in log space by
a Huber objective with the reference's penalties, from the best starts of its grid plus the
beta -> 0 limit. Pure numpy/scipy; ado.py says which choices are ours.
"""

from __future__ import annotations

import functools

import numpy as np

# The reference's fixed constants of (E2): penalty kinks per parameter (a, e, alpha) and the
# start grid (alpha from float32 arange, as the reference builds it).
KINKS = ((6.5,), (0.5,), (0.001, 0.8))
SLOPES = ((0.0, 1.0), (-1.0, 0.0), (-1.0, 0.0, 1.0))
"""Slope of the penalty of each parameter in each of its regions (region i lies above i kinks)."""
MAIN_REGION = (0, 1, 1)
"""The box a <= 6.5, e >= 0.5, 0.001 <= alpha <= 0.8, where the penalty is the constant -0.001."""
GRID_A = np.arange(-2.0, 6.0)
GRID_E = np.arange(-2.0, 2.0, 0.5)
GRID_ALPHA = np.arange(0.0, 0.8, 0.1, dtype=np.float32).astype(np.float64)
LOSS_FLOOR = 1e-12
RANK_POINTS = 64


def penalty(a: float, e: float, alpha: float) -> float:
    """The penalty terms of (E2)."""
    (a_hi,), (e_lo,), (alpha_lo, alpha_hi) = KINKS
    return max(alpha - alpha_hi, 0.0) - min(alpha, alpha_lo) + max(a - a_hi, 0.0) - min(e - e_lo, 0.0)


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def fit_objective(theta, x: np.ndarray, y: np.ndarray, *, delta: float = 1e-3) -> float:
    """(E2) at theta = (a, e, alpha) on points (x, y): the reference's loss_fn, in float64."""
    a, e, alpha = (float(v) for v in theta)
    pred = np.logaddexp(a - alpha * np.log(np.asarray(x, dtype=np.float64)), e)
    r = np.log(np.maximum(np.asarray(y, dtype=np.float64), LOSS_FLOOR)) - pred
    return float(_huber(r, delta).sum()) + penalty(a, e, alpha)


def _region_objective(
    theta: np.ndarray, log_x: np.ndarray, log_y: np.ndarray, delta: float, slopes: np.ndarray
) -> tuple[float, np.ndarray]:
    """(data term + the region's linear penalty) / delta and its gradient in (a, e, alpha)."""
    # Few numpy calls: L-BFGS-B calls this about 80 times per start, on arrays of tens to hundreds
    # of points, where numpy's per-call overhead is most of the cost.
    a, e, alpha = float(theta[0]), float(theta[1]), float(theta[2])
    u = log_x * -alpha
    u += a
    pred = np.logaddexp(u, e)
    r = pred - log_y
    d = np.clip(r, -delta, delta)  # huber'(r); huber(r) = d (r - d/2)
    f = float(np.dot(d, r - 0.5 * d))
    share = np.exp(u - pred)  # d pred / d a; 1 - share is d pred / d e
    ds = d * share
    sd, sds = float(d.sum()), float(ds.sum())
    grad = np.array([sds, sd - sds, -float(np.dot(ds, log_x))])
    f += slopes[0] * a + slopes[1] * e + slopes[2] * alpha
    return f / delta, (grad + slopes) / delta


def _data_gradient(theta: np.ndarray, log_x: np.ndarray, log_y: np.ndarray, delta: float) -> np.ndarray:
    return _region_objective(theta, log_x, log_y, delta, np.zeros(3))[1] * delta


def _region_bounds(region: tuple[int, ...]) -> list[tuple[float | None, float | None]]:
    return [
        (kinks[r - 1] if r > 0 else None, kinks[r] if r < len(kinks) else None)
        for kinks, r in zip(KINKS, region, strict=True)
    ]


def _local_fit(
    theta0: np.ndarray, log_x: np.ndarray, log_y: np.ndarray, delta: float, maxiter: int
) -> tuple[np.ndarray, float]:
    """A local minimum of (E2) from theta0: L-BFGS-B within one linear region of the penalties,
    moving to a neighbouring region while the data pull across a kink harder than its slope."""
    from scipy.optimize import minimize

    region = MAIN_REGION
    theta = np.asarray(theta0, dtype=np.float64)
    seen = set()
    while region not in seen:
        seen.add(region)
        bounds = _region_bounds(region)
        lo = [-np.inf if b[0] is None else b[0] for b in bounds]
        hi = [np.inf if b[1] is None else b[1] for b in bounds]
        slopes = np.array([SLOPES[j][r] for j, r in enumerate(region)])
        res = minimize(
            _region_objective,
            np.clip(theta, lo, hi),
            args=(log_x, log_y, delta, slopes),
            jac=True,
            method="L-BFGS-B",
            bounds=bounds,
            options={"maxiter": maxiter},
        )
        theta = np.asarray(res.x, dtype=np.float64)
        if not np.isfinite(theta).all():
            break
        g = _data_gradient(theta, log_x, log_y, delta)
        move = list(region)
        for j, r in enumerate(region):
            if r < len(KINKS[j]) and theta[j] >= KINKS[j][r] and g[j] + SLOPES[j][r + 1] < 0:
                move[j] = r + 1  # the data pull upward across the kink harder than the penalty
            elif r > 0 and theta[j] <= KINKS[j][r - 1] and g[j] + SLOPES[j][r - 1] > 0:
                move[j] = r - 1
        region = tuple(move)
    f = float(_huber(np.logaddexp(theta[0] - theta[2] * log_x, theta[1]) - log_y, delta).sum())
    return theta, f + penalty(*theta)


def _limit_fit(log_y: np.ndarray, delta: float) -> tuple[float, float]:
    """The beta -> 0 limit of (E2): log L = e. The objective is convex in e and its derivative
    sum psi(e - log y) - [e < 0.5] is monotone: bisection finds its zero. Returns (e, objective)."""
    lo, hi = float(log_y.min()) - 1.0, max(float(log_y.max()), 0.5) + 1.0
    lo = min(lo, 0.5 - 1.0)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        g = float(np.clip(mid - log_y, -delta, delta).sum()) - (1.0 if mid < 0.5 else 0.0)
        if g > 0:
            hi = mid
        else:
            lo = mid
    e = 0.5 * (lo + hi)
    return e, float(_huber(e - log_y, delta).sum()) + penalty(-np.inf, e, 0.001)


@functools.cache
def _grid_starts() -> np.ndarray:
    """The reference's 512 starts (a outermost, alpha fastest), projected into the penalty-free
    box; duplicates dropped, first occurrence kept."""
    a, e, al = np.meshgrid(GRID_A, GRID_E, GRID_ALPHA, indexing="ij")
    grid = np.stack([a.ravel(), e.ravel(), al.ravel()], axis=1)
    lo = [-np.inf, KINKS[1][0], KINKS[2][0]]
    hi = [KINKS[0][0], np.inf, KINKS[2][1]]
    proj = np.clip(grid, lo, hi)
    _, first = np.unique(proj, axis=0, return_index=True)
    out = proj[np.sort(first)]
    out.flags.writeable = False
    return out


def fit_scaling_law(
    x: np.ndarray, y: np.ndarray, *, delta: float = 1e-3, starts: int = 2, maxiter: int = 200
) -> tuple[float, float, float, float]:
    """(a, e, alpha, objective) minimising (E2) on the points (x, y); a = -inf is the beta -> 0
    limit. See the module docstring for the search."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    log_x, log_y = np.log(x), np.log(np.maximum(y, LOSS_FLOOR))
    grid = _grid_starts()
    m = log_x.shape[0]
    pick = np.unique(np.linspace(0, m - 1, min(m, RANK_POINTS)).round().astype(np.int64))
    pred = np.logaddexp(grid[:, :1] - grid[:, 2:] * log_x[pick], grid[:, 1:2])
    ranked = np.argsort(_huber(pred - log_y[pick], delta).sum(axis=1), kind="stable")
    e0, best_f = _limit_fit(log_y, delta)
    best = (-np.inf, e0, KINKS[2][0])
    for i in ranked[: max(1, starts)]:
        theta, f = _local_fit(grid[i], log_x, log_y, delta, maxiter)
        if np.isfinite(theta).all() and f < best_f:
            best, best_f = (float(theta[0]), float(theta[1]), float(theta[2])), f
    return best[0], best[1], best[2], best_f


def fit_scaling_laws(
    x: np.ndarray, y: np.ndarray, *, delta: float = 1e-3, starts: int = 2
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per column k of y (points in rows; x has one column, or one per domain):
    (beta, eps, alpha, objective) of (E2). Points with x <= 0 are left out; a column without any
    point gets NaN (which rejects the fit)."""
    y = np.asarray(y, dtype=np.float64)
    x = np.broadcast_to(np.asarray(x, dtype=np.float64), y.shape)
    K = y.shape[1]
    out = np.full((4, K), np.nan)
    for k in range(K):
        ok = x[:, k] > 0
        if ok.any():
            a, e, alpha, f = fit_scaling_law(x[ok, k], y[ok, k], delta=delta, starts=starts)
            out[:, k] = np.exp(a), np.exp(e), alpha, f
    return out[0], out[1], out[2], out[3]
