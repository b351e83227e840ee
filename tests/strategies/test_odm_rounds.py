"""ODM's paper variant counts rounds as training steps (Algorithm 1), whatever the update window."""

from __future__ import annotations

import numpy as np
import pytest

from mixer.signals import Report, Window
from mixer.strategies import build_strategy
from mixer.strategies.odm import exploration_rate


@pytest.mark.parametrize("update_every", [1, 10, 37])
def test_exploration_decays_with_the_step_not_the_window_count(make_spec, update_every) -> None:
    K = 4
    strategy = build_strategy(make_spec("odm", {}, K=K, cadence={"update_every": update_every}))
    state = strategy.init(0)
    rng = np.random.default_rng(0)
    for window in range(1, 6):
        last = window * update_every - 1  # the window's last step
        reports = [
            Report(step=s, source="w", domain_loss_sum=rng.random(K) + 1, domain_token_count=np.ones(K))
            for s in range(last - update_every + 1, last + 1)
        ]
        state, decision = strategy.update(state, Window(reports, K))
        assert decision.params["eps"] == pytest.approx(exploration_rate(K, last + 1))
