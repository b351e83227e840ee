"""Aioli's step size follows its EMA setting unless given: one LearnParams round, re-derived in float64."""

from __future__ import annotations

import numpy as np
import pytest

from mixer.signals import Report, Window
from mixer.spec import SpecError
from mixer.strategies import aioli as aioli_module
from mixer.strategies import build_strategy

K, LP_STEPS, OHF = 3, 2, 0.75


def _round(strategy) -> tuple[np.ndarray, list[int], list[np.ndarray], np.ndarray]:
    """Drive one round (lp_rounds = 1) with stored validation losses; return the
    losses before the round, the probe order, the losses after each segment and the final weights."""
    rng = np.random.default_rng(7)
    state = strategy.init(0)
    loss0 = 3.0 + rng.random(K)
    state, decision = strategy.update(state, Window([Report(step=0, source="v", val_loss=loss0)], K))
    assert decision is not None and decision.params["probing"]
    order = [int(j) for j in state["order"]]
    afters, loss, decision = [], loss0, None
    for _ in order:
        loss = loss - 0.05 - 0.1 * rng.random(K)
        step = state["segment_start"] + LP_STEPS
        state, decision = strategy.update(state, Window([Report(step=step, source="v", val_loss=loss)], K))
        assert decision is not None
        afters.append(loss.copy())
    assert decision.params["probing"] is False
    return loss0, order, afters, np.asarray(decision.weights)


def _rederive(loss0, order, afters, prior, eta) -> np.ndarray:
    """Algorithm 2 (LearnParams) and the update, written out in float64."""
    G = np.zeros((K, K))
    prev = loss0
    for j, after in zip(order, afters):
        G[:, j] += prev - after
        prev = after
    M = np.full((K, K), (1 - OHF) / (K - 1))
    np.fill_diagonal(M, OHF)
    A = G @ np.linalg.inv(M).T
    if A.min() < 0:
        A = A - A.min()
    A = A / A.sum()
    w = prior * np.exp(eta * A.sum(axis=0))
    return w / w.sum()


@pytest.mark.parametrize(
    ("ema", "eta", "expected_eta"),
    [
        (None, None, aioli_module.ETA_WITHOUT_EMA),
        (0.1, None, aioli_module.ETA_WITH_EMA),
        (None, 0.7, 0.7),
    ],
)
def test_eta_follows_the_ema_setting(make_spec, ema, eta, expected_eta) -> None:
    params = {"lp_rounds": 1, "lp_steps": LP_STEPS, "one_hot_factor": OHF, "update_steps": 100, "ema": ema}
    if eta is not None:
        params["eta"] = eta
    strategy = build_strategy(make_spec("aioli", params, K=K, cadence={"update_every": 1}))
    assert strategy.eta == expected_eta
    loss0, order, afters, weights = _round(strategy)
    # The first round is the same with and without the EMA (E = A), so only eta tells them apart.
    expected = _rederive(loss0, order, afters, strategy.prior, expected_eta)
    np.testing.assert_allclose(weights, expected, rtol=1e-12, atol=1e-15)
    other = _rederive(loss0, order, afters, strategy.prior, 1.0 if expected_eta != 1.0 else 0.2)
    assert np.abs(weights - other).max() > 1e-6, "the round's data cannot tell the step sizes apart"


@pytest.mark.parametrize("eta", [0.0, -1.0, 1e4, True, "1"])
def test_eta_out_of_range_is_refused(make_spec, eta) -> None:
    with pytest.raises(SpecError, match=r"strategy\.params\.eta"):
        build_strategy(make_spec("aioli", {"eta": eta}, K=K))
