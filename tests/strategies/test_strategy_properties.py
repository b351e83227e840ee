"""Properties every registered strategy keeps, for any valid stream of reports through the Engine:
weights finite, on the simplex and within [min_weight, max_weight]; the same seed gives the same
trajectory, also when a snapshot taken mid-stream is restored and continued; strategy state
survives encode_state/decode_state exactly."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixer.agent.policy import fresh_model
from mixer.engine import Engine, Version
from mixer.signals import Report, validate_report
from mixer.spec import JobSpec
from mixer.strategies import REGISTRY
from mixer.strategies.base import decode_state, encode_state

# Parameter sets that make each strategy act within a short stream (defaults wait hundreds of steps).
FAST_PARAMS: dict[str, list[dict[str, Any]]] = {
    "odm": [{}, {"variant": "exp3", "reward_scale": 0.1}, {"variant": "reference", "alpha": 0.5}],
    "doremi": [{}, {"mode": "online", "output": "average", "initial_score": 10.8, "average_includes_initial": True, "c": 0.0}],
    "ado": [{"warmup_steps": 2, "refit_every": 16, "max_points": 8}],
    "aioli": [
        {"lp_rounds": 1, "lp_steps": 1, "update_steps": 8},
        {
            "lp_rounds": 2,
            "lp_steps": 1,
            "update_steps": 12,
            "ema": 0.5,
            "eta": 5.0,
            "normalize": False,
            "one_hot_factor": 1.0,
        },
        {"lp_rounds": 1, "lp_steps": 2, "update_steps": 12, "diagonal": True},
    ],
    "dga": [{}, {"target": ["d0"], "ema": 0.0, "clip_min": -1.0, "eta": 3.0, "eps": 0.01}],
    "toremi": [{"switch_step": 8}, {"switch_step": 0, "num_topics": 4, "w_max": 2.0}],
    "dwm": [{"stage_steps": 4}, {"stage_steps": 6, "learn_steps": 2}],
}
CASES = [
    pytest.param(name, i, params, id=f"{name}-{i}")
    for name in sorted(REGISTRY)
    for i, params in enumerate(FAST_PARAMS.get(name, [{}]))
]


@st.composite
def jobs(draw: st.DrawFn) -> tuple[dict[str, Any], int, int]:
    K = draw(st.integers(1, 5))
    weights = draw(
        st.lists(st.sampled_from([0.0, 0.5, 1.0, 3.0]), min_size=K, max_size=K).filter(lambda w: sum(w) > 0)
    )
    cadence = {
        "update_every": draw(st.integers(1, 4)),
        "warmup_steps": draw(st.integers(0, 3)),
        "delay": draw(st.integers(0, 2)),
        "min_weight": draw(st.sampled_from([0.0, 0.01, 0.05])) if K > 1 else 0.0,
        "max_weight": draw(st.sampled_from([1.0, 0.9])) if K > 1 else 1.0,
        "prior_smoothing": draw(st.sampled_from([0.0, 0.1])),
    }
    job = {
        "name": "prop",
        "domains": [{"name": f"d{i}", "weight": w} for i, w in enumerate(weights)],
        "cadence": cadence,
        "seed": draw(st.integers(0, 2**32 - 1)),
    }
    return job, draw(st.integers(4, 40)), draw(st.integers(0, 2**32 - 1))


def make_reports(K: int, n_steps: int, data_seed: int) -> list[Report]:
    """A valid stream: one or two sources per step, each field present at random."""
    rng = np.random.default_rng(data_seed)
    out = []
    for step in range(n_steps):
        for source in ("w0", "w1")[: rng.integers(1, 3)]:
            r = Report(step=step, source=source)
            if rng.random() < 0.9:
                tokens = rng.integers(0, 40, K).astype(np.float64) * (rng.random(K) < 0.85)
                r.domain_token_count = tokens
                r.domain_loss_sum = tokens * rng.uniform(0.5, 8.0, K)
                r.domain_sample_count = (tokens > 0) * rng.integers(1, 4, K)
                if rng.random() < 0.8:
                    r.excess_loss_sum = tokens * rng.uniform(0.0, 1.0, K)
            if rng.random() < 0.5:
                val = rng.uniform(1.0, 7.0, K)
                val[rng.random(K) < 0.1] = np.nan
                r.val_loss = val
            if rng.random() < 0.4:
                r.alignment = rng.normal(0.0, 2.0, K)
                if rng.random() < 0.5:
                    r.extra = {
                        "grad_norm_mean": float(rng.uniform(0.1, 3.0)),
                        "lr": float(rng.uniform(0.0, 1.0)),
                    }
            if rng.random() < 0.6:
                n = int(rng.integers(0, 20))
                r.sample_loss = rng.uniform(0.0, 9.0, n)
                r.sample_domain = rng.integers(0, K, n)
                r.sample_topic = rng.integers(0, 6, n)
                r.sample_id = rng.integers(0, 10**9, n)
                if rng.random() < 0.7:
                    r.sample_align = rng.normal(0.0, 1.0, n)
            out.append(validate_report(r, K))
    return out


def run(spec: JobSpec, reports: list[Report], cut: int | None = None) -> list[Version]:
    engine = Engine(spec)
    versions = [engine.current]
    for seq, r in enumerate(reports):
        if seq == cut:
            snap = engine.snapshot()
            engine = Engine.restore(spec, snap)
            assert engine.snapshot() == snap, "restore then snapshot changed the engine state"
        v = engine.ingest(r, seq)
        if v is not None:
            versions.append(v)
        assert_state_round_trips(engine.state)
    return versions


def assert_state_round_trips(state: Any) -> None:
    again = decode_state(encode_state(state))
    assert encode_state(again) == encode_state(state)
    _assert_same(again, state, "state")


def _assert_same(a: Any, b: Any, where: str) -> None:
    if isinstance(b, np.ndarray):
        assert isinstance(a, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape, where
        assert np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"), where
    elif isinstance(b, dict):
        assert isinstance(a, dict) and a.keys() == b.keys(), where
        for k in b:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(b, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(b, float) and np.isnan(b):
        assert isinstance(a, float) and np.isnan(a), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.parametrize(("name", "case", "params"), CASES)
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(job=jobs(), cut_frac=st.floats(0.0, 1.0))
def test_engine_trajectory_properties(name, case, params, job, cut_frac):
    job_dict, n_steps, data_seed = job
    if name == "agent":  # the agent's network is sized to the job's domains, which vary here
        params = {"model": fresh_model([d["name"] for d in job_dict["domains"]])}
    job_dict = dict(job_dict, strategy={"name": name, "params": params})
    spec = JobSpec.from_dict(job_dict)
    K, c = spec.num_domains, spec.cadence
    reports = make_reports(K, n_steps, data_seed)

    versions = run(spec, reports)
    for v in versions:
        w = v.weights
        assert w.shape == (K,) and np.isfinite(w).all(), v
        assert abs(w.sum() - 1.0) < 1e-9, w
        assert (w >= c.min_weight - 1e-12).all() and (w <= c.max_weight + 1e-12).all(), (w, c)

    # A second run from the same seed, snapshotted and restored mid-stream: its prefix checks
    # determinism, its suffix that restore continues exactly.
    resumed = run(spec, reports, cut=int(cut_frac * len(reports)))
    assert len(resumed) == len(versions)
    for a, b in zip(resumed, versions):
        assert a.same_as(b), f"same seed, different trajectory at version {b.version}: {a} != {b}"
