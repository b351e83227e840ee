"""The DWM strategy: stages, what trains the weighting model, what a version carries, purity."""

from __future__ import annotations

import numpy as np
import pytest

from mixer.engine import Engine
from mixer.signals import Report, Window, validate_report
from mixer.spec import JobSpec, SpecError
from mixer.strategies import build_strategy
from mixer.strategies.base import decode_state, encode_state
from mixer.strategies.dwm import canonical_safetensors
from mixer.weighting import dwm

K = 2


def spec(params: dict | None = None, weighting: dict | None = None, **cadence) -> JobSpec:
    data = {
        "name": "dwm",
        "domains": [{"name": "a", "weight": 3.0}, {"name": "b", "weight": 1.0}],
        "strategy": {"name": "dwm", "params": params or {}},
        "cadence": {"update_every": 1, **cadence},
        "seed": 5,
    }
    if weighting is not None:
        data["weighting"] = weighting
    return JobSpec.from_dict(data)


def report(
    step: int, rng: np.random.Generator, n: int = 32, *, align: bool = True, loss_scale: float = 1.0
) -> Report:
    domain = rng.integers(0, K, n)
    loss = rng.uniform(1.0, 5.0, n) * loss_scale
    r = Report(
        step=step, source="w", sample_loss=loss, sample_domain=domain, sample_topic=rng.integers(0, 3, n)
    )
    if align:
        r.sample_align = 3.0 - loss + rng.normal(0.0, 0.1, n)  # low-loss samples help validation
    return validate_report(r, K)


def run(s: JobSpec, reports: list[Report]):
    engine = Engine(s)
    versions = [v for seq, r in enumerate(reports) if (v := engine.ingest(r, seq)) is not None]
    return engine, versions


def test_stages_publish_after_each_learning_phase_and_ignore_frozen_alignments() -> None:
    rng = np.random.default_rng(0)
    s = spec({"stage_steps": 10, "learn_steps": 4}, {"name": "dwm", "params": {"hidden": 4, "num_topics": 3}})
    engine, versions = run(s, [report(step, rng) for step in range(30)])
    # One version per stage, from the report of the learning phase's last step, 4 batches each.
    assert [(v.trigger_step, v.params["stage"], v.params["phi_updates"]) for v in versions] == [
        (3, 0, 4),
        (13, 1, 8),
        (23, 2, 12),
    ]
    assert versions[0].params["stage_steps"] == 10 and versions[0].params["learn_steps"] == 4
    assert engine.state["samples"] == 12 * 32
    strategy = engine.strategy
    assert [strategy.learning_at(t) for t in (0, 3, 4, 9, 10)] == [True, True, False, False, True]
    for v in versions:
        np.testing.assert_allclose(v.weights, [0.75, 0.25])  # the prior: DWM weights instances only
        params, builder = dwm.from_bytes(v.blob)
        assert "opt.t" not in params and builder.num_features == dwm.FIXED_FEATURES + K + 3


def test_hyperparameters_come_from_weighting_params_else_defaults() -> None:
    s = spec({"stages": 4}, {"name": "dwm", "params": {"hidden": 6, "total_steps": 400, "lr": 0.01}})
    strategy = build_strategy(s)
    assert strategy.config.hidden == 6 and strategy.config.lr == 0.01 and strategy.stage_length == 100
    other = build_strategy(spec({}, {"name": "loss"}))
    assert other.config.hidden == 32 and other.stage_length == 20_000  # DwmParams defaults, 5 stages
    with pytest.raises(SpecError, match="strategy.params.learn_steps"):
        spec({"stage_steps": 10, "learn_steps": 11})
    with pytest.raises(SpecError, match="strategy.params.stages"):
        spec({"stages": 0})
    with pytest.raises(SpecError, match="weighting.params.hidden"):
        spec({}, {"name": "dwm", "params": {"hidden": 0}})


def test_trained_model_favours_aligned_samples_and_state_round_trips() -> None:
    rng = np.random.default_rng(1)
    s = spec({"stage_steps": 40}, {"name": "dwm", "params": {"hidden": 8, "lr": 0.02}})
    engine, versions = run(s, [report(step, rng) for step in range(40)])
    (v,) = versions
    params, builder = dwm.from_bytes(v.blob)
    import torch

    losses = torch.tensor([1.5, 4.5, 1.5, 4.5])
    w = dwm.weights_for_step(40, losses, torch.tensor([0, 0, 1, 1]), params, builder)
    assert w[0] > w[1] and w[2] > w[3]
    state = engine.state
    again = decode_state(encode_state(state))
    assert encode_state(again) == encode_state(state)
    assert again["phi"]["W1"].dtype == np.float32 and int(again["phi"]["opt.t"]) == 40


def test_same_log_same_blob_bytes_and_window_without_alignment_is_quiet() -> None:
    s = spec({"stage_steps": 5})
    a = run(s, [report(t, np.random.default_rng(t)) for t in range(10)])[1]
    b = run(s, [report(t, np.random.default_rng(t)) for t in range(10)])[1]
    assert [v.blob for v in a] == [v.blob for v in b] and len(a) == 2
    assert canonical_safetensors(a[0].blob) == a[0].blob
    strategy = build_strategy(s)
    state = strategy.init(0)
    rng = np.random.default_rng(0)
    new, decision = strategy.update(
        state, Window([report(0, rng, align=False), report(4, rng, align=False)], K)
    )
    assert decision is None and new["phi"] == {} and new["pending"] == 0


def test_overflowing_losses_skip_the_window_and_keep_the_model() -> None:
    s = spec({"stage_steps": 4})
    rng = np.random.default_rng(0)
    strategy = build_strategy(s)
    state, _ = strategy.update(strategy.init(0), Window([report(0, rng)], K))
    before = encode_state(state)
    huge = report(1, rng, loss_scale=6e37)  # finite float32, but a feature row overflows its sum
    new, decision = strategy.update(state, Window([huge], K))
    assert decision is None and new["skipped"] == 1
    assert encode_state(dict(new, skipped=0)) == before
