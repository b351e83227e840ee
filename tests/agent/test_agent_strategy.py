"""The `agent` strategy alone (no Ray, no training): any accepted stream of reports keeps its weights
on the simplex and its state finite, a snapshot restores to the same trajectory, and its inputs are
laid out as the training data lays them out."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixer.agent.policy import fresh_model
from mixer.agent.trajectory import Trajectory, sample_schedule, transitions
from mixer.engine import Engine
from mixer.signals import MAX_LOSS, Report, SignalError, validate_report
from mixer.spec import JobSpec
from mixer.strategies.agent import actor_forward, decode_model
from mixer.strategies.base import decode_state, encode_state

DOMAINS = ["a", "b", "c"]
LOSS_EDGES = [float("nan"), -MAX_LOSS, 0.0, 5e-324, 1e-7, 1.0, 3.5, 1e5, MAX_LOSS]


def _spec(**cadence) -> JobSpec:
    return JobSpec.from_dict(
        {
            "name": "p",
            "domains": DOMAINS,
            "strategy": {"name": "agent", "params": {"model": fresh_model(DOMAINS, seed=1)}},
            "cadence": {"update_every": 1, **cadence},
        }
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    losses=st.lists(st.lists(st.sampled_from(LOSS_EDGES), min_size=3, max_size=3), min_size=1, max_size=8),
    cut=st.integers(0, 8),
    floor=st.sampled_from([0.0, 0.05]),
)
def test_any_accepted_stream_keeps_weights_on_the_simplex_and_restores(losses, cut, floor) -> None:
    spec = _spec(min_weight=floor)
    reports = []
    for step, val in enumerate(losses):
        try:
            reports.append(validate_report(Report(step=step, source="w", val_loss=np.array(val)), 3))
        except SignalError:
            continue
    engine, other = Engine(spec), Engine(spec)
    a, b = [], []
    for seq, r in enumerate(reports):
        if seq == cut:
            other = Engine.restore(spec, other.snapshot())
        for eng, out in ((engine, a), (other, b)):
            v = eng.ingest(r, seq)
            if v is not None:
                assert np.isfinite(v.weights).all() and abs(v.weights.sum() - 1.0) < 1e-9
                assert (v.weights >= floor - 1e-12).all()
                out.append(v.weights.tobytes())
        state = engine.state
        assert encode_state(decode_state(encode_state(state))) == encode_state(state)
        for k in ("weights", "losses", "proposal"):
            assert np.isfinite(state[k]).all(), k
    assert a == b  # a restored engine continues exactly as one that never stopped
    usable = sum(
        1
        for r in reports
        if np.isfinite(r.val_loss).all() and (r.val_loss >= 1e-6).all() and (r.val_loss <= 1e6).all()
    )
    assert len(a) == usable  # one re-weighting step per usable evaluation, the others skipped


def test_the_strategy_sees_the_state_the_training_data_holds() -> None:
    """Replaying a recorded trajectory's evaluations through the strategy gives, at every step, the
    actor's output on the very state vector `transitions` builds for training."""
    model = fresh_model(DOMAINS, history=2, horizon=4, seed=3)
    actor, _ = decode_model(model)
    rng = np.random.default_rng(0)
    losses = 5.0 - np.cumsum(rng.uniform(0.0, 0.3, (4, 3)), axis=0)
    spec = JobSpec.from_dict(
        {
            "name": "p",
            "domains": DOMAINS,
            "strategy": {"name": "agent", "params": {"model": model}},
            "cadence": {"update_every": 1},
        }
    )
    engine = Engine(spec)
    applied = [engine.current.weights]
    for step, val in enumerate(losses[:-1]):
        v = engine.ingest(validate_report(Report(step=step, source="w", val_loss=val), 3), step)
        applied.append(v.weights)
    traj = Trajectory("t", tuple(DOMAINS), 1, np.stack(applied), losses)
    data = transitions([traj], history=2, horizon=4)
    # transition i: the state after evaluation i + 1, whose action the strategy chose as version i + 2
    for i in range(len(data)):
        np.testing.assert_allclose(
            actor_forward(actor, data.s[i].astype(np.float64)), applied[i + 1], atol=1e-6
        )


def test_sampled_trajectories_are_distributions_that_move() -> None:
    rng = np.random.Generator(np.random.PCG64(0))
    a = sample_schedule(5, 6, rng, alpha0=1.0, kappa=10.0)
    assert a.shape == (6, 5) and np.allclose(a.sum(1), 1.0) and (a > 0).all()
    assert not np.allclose(a[0], a[1])
    again = sample_schedule(5, 6, np.random.Generator(np.random.PCG64(0)), alpha0=1.0, kappa=10.0)
    assert np.array_equal(a, again)


def test_the_reward_can_leave_unscored_domains_out() -> None:
    """reward_ignore takes a domain out of the reward's mean (not out of the state), relative to the
    first evaluation's mean over every domain; a name that is not a domain, or ignoring them all, is refused."""
    from mixer.agent.trajectory import TrajectoryError

    rng = np.random.default_rng(1)
    losses = 5.0 - np.cumsum(rng.uniform(0.0, 0.3, (5, 3)), axis=0)
    actions = rng.dirichlet(np.ones(3), 5)
    traj = Trajectory("t", tuple(DOMAINS), 1, actions, losses)
    every = transitions([traj], history=2, horizon=5, reward_scale=100.0)
    some = transitions([traj], history=2, horizon=5, reward_scale=100.0, reward_ignore=(DOMAINS[-1],))
    rel = losses / losses[0].mean()
    np.testing.assert_allclose(every.r, 100.0 * (rel[:-1].mean(1) - rel[1:].mean(1)), rtol=1e-5)
    np.testing.assert_allclose(some.r, 100.0 * (rel[:-1, :-1].mean(1) - rel[1:, :-1].mean(1)), rtol=1e-5)
    np.testing.assert_array_equal(every.s, some.s)
    for bad, what in (((DOMAINS[0], "x"), "'x'"), (tuple(DOMAINS), "no domain")):
        with pytest.raises(TrajectoryError, match=what):
            transitions([traj], history=2, horizon=5, reward_ignore=bad)
