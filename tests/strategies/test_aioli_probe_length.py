"""Aioli's probe segments last lp_steps training steps: a validation after s completed steps counts."""

from __future__ import annotations

import numpy as np

from mixer.signals import Report, Window
from mixer.strategies import build_strategy


def test_a_segment_ends_only_after_all_its_steps(make_spec) -> None:
    K, lp_steps, delay = 3, 5, 1
    spec = make_spec(
        "aioli",
        {"lp_rounds": 1, "lp_steps": lp_steps, "update_steps": 100},
        K=K,
        cadence={"update_every": 1, "delay": delay},
    )
    strategy = build_strategy(spec)
    state = strategy.init(0)
    val = np.full(K, 3.0)
    # The first fresh validation (after 0 steps) starts the round: the first probe takes effect at 0 + delay.
    state, decision = strategy.update(state, Window([Report(step=0, source="v", val_loss=val)], K))
    assert decision is not None and decision.params["probing"]
    start = state["segment_start"]
    assert start == delay
    # After start + lp_steps - 1 completed steps the probe has trained one step short: not yet.
    short = Report(step=start + lp_steps - 1, source="v", val_loss=val - 0.1)
    state, decision = strategy.update(state, Window([short], K))
    assert decision is None and state["segment"] == 0
    done = Report(step=start + lp_steps, source="v", val_loss=val - 0.2)
    state, decision = strategy.update(state, Window([done], K))
    assert decision is not None and state["segment"] == 1
