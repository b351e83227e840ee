"""DGA with its own defaults (EMA, self-alignment dropped, lr_t / mu steps) against a float64
re-derivation of its equations, on the stored per-domain gradients of the DoGE conformance file.

Per update: g_i <- g_i min(1, max_norm / (||g_i|| + 1e-6)) (DoGE's per-domain clipping), W_i =
<g_i, sum_{j in target} g_j> - [i in target] <g_i, g_i>, W <- clip(W / (mean_i ||g_i|| + 1e-6),
clip_min, clip_max), alpha' = softmax(log alpha + s W) with s = lr_t / mu (or eta when no lr is
sent), alpha <- ema alpha + (1 - ema) ((1 - eps) alpha' + eps / K).
"""

from __future__ import annotations

import numpy as np
import pytest

from mixer.signals import Report, Window
from mixer.strategies import build_strategy

MAX_GRAD_NORM = 1.0
TARGET = [0, 2]  # specialised DGA: two of the five domains are the target


def _gradients(data: dict) -> list[np.ndarray]:
    """Per step, the K train domains' gradients (the stored rows; a domain absent there is a zero row)."""
    K = data["hyperparameters"]["common"]["K_train"]
    D = data["hyperparameters"]["common"]["gradient_dim"]
    return [
        np.stack(
            [
                np.asarray(g, np.float64) if g is not None else np.zeros(D)
                for g in step["domain_gradients"][:K]
            ]
        )
        for step in data["inputs"]["steps"]
    ]


def _worker(G: np.ndarray) -> tuple[np.ndarray, float]:
    """What the probe sends: W (self term dropped for target domains) and the mean clipped norm."""
    norms = np.linalg.norm(G, axis=1)
    G = G * np.minimum(1.0, MAX_GRAD_NORM / (norms + 1e-6))[:, None]
    target = G[TARGET].sum(axis=0)
    W = G @ target
    W[TARGET] -= (G[TARGET] ** 2).sum(axis=1)
    return W, float(np.linalg.norm(G, axis=1).mean())


@pytest.mark.parametrize("send_lr", [True, False])
def test_dga_defaults_follow_the_equations(conformance, make_spec, send_lr) -> None:
    data = conformance("doge")
    lrs = data["inputs"]["lr_t"]
    strategy = build_strategy(make_spec("dga", {"target": ["d0", "d2"]}, K=5))
    p = strategy.params
    assert p["exclude_self"] and p["ema"] > 0, "the defaults exercise the EMA and the dropped self term"
    state = strategy.init(0)
    alpha = strategy.prior.copy()
    history = []
    moved = 0.0
    for t, G in enumerate(_gradients(data)):
        W, norm = _worker(G)
        extra = {"grad_norm_mean": norm, **({"lr": lrs[t]} if send_lr else {})}
        state, decision = strategy.update(
            state, Window([Report(step=t, source="w", alignment=W, extra=extra)], 5)
        )
        step = lrs[t] / p["mu"] if send_lr else p["eta"]
        score = np.clip(W / (norm + 1e-6), p["clip_min"], p["clip_max"])
        z = np.log(alpha) + step * score
        a = np.exp(z - z.max())
        a /= a.sum()
        a = (1 - p["eps"]) * a + p["eps"] / 5
        new = p["ema"] * alpha + (1 - p["ema"]) * a
        moved = max(moved, float(np.abs(new - alpha).max()))
        alpha = new
        history.append(alpha)
        np.testing.assert_allclose(decision.weights, alpha, rtol=1e-12, atol=1e-15, err_msg=f"step {t}")
        np.testing.assert_allclose(
            decision.params["avg_weights"],
            np.mean(history, axis=0),
            rtol=1e-12,
            atol=1e-15,
            err_msg=f"step {t}",
        )
    assert moved > 1e-3, "the stored gradients never moved the weights: nothing was compared"
