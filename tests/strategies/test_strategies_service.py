"""Every registered strategy is selectable from a job spec and runs end to end through a real server:
the job is created over gRPC, synthetic reports carrying exactly the signals the strategy declares
are streamed, several versions come back, their weights are on the simplex and floored, their
params carry what the strategy promises, and replaying the stored log re-derives every stored
version bit for bit (`mixer.replay.verify`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from mixer import signals as sig
from mixer.agent.policy import fresh_model
from mixer.client import MixerClient
from mixer.engine import Version
from mixer.replay import verify
from mixer.signals import Report
from mixer.store import Store
from mixer.strategies import REGISTRY

K = 3
TOPICS = 4
STEPS = 48
SAMPLES = 24
CADENCE = {"update_every": 2, "min_weight": 0.02, "delay": 1}


def _static(vs: list[Version]) -> None:
    np.testing.assert_allclose(vs[1].weights, [0.6, 0.2, 0.2], rtol=0, atol=1e-12)
    np.testing.assert_allclose(vs[-1].weights, [1 / 6, 1 / 6, 4 / 6], rtol=0, atol=1e-12)
    assert all(v.params == {} for v in vs)


def _odm(vs: list[Version]) -> None:
    assert all(0.0 < v.params["eps"] <= 1.0 / K for v in vs[1:])


def _doremi(vs: list[Version]) -> None:
    for v in vs[1:]:
        avg = np.asarray(v.params["avg_weights"])
        assert avg.shape == (K,) and abs(avg.sum() - 1.0) < 1e-9 and (avg >= 0).all()
        assert len(v.params["excess_loss"]) == K
    # The domain with the largest excess loss gains weight (alpha); in mode paper, the default, the
    # served mixture stays the prior and alpha reaches the loss as alpha / prior.
    assert vs[-1].params["alpha"][2] > vs[0].weights[2]
    assert all(np.array_equal(v.weights, vs[0].weights) for v in vs)
    np.testing.assert_allclose(
        vs[-1].params["domain_loss_weights"], np.asarray(vs[-1].params["alpha"]) / vs[0].weights, rtol=1e-12
    )


def _ado(vs: list[Version]) -> None:
    for v in vs[1:]:
        assert abs(sum(v.params["rho"]) - 1.0) < 1e-9
        assert len(v.params["scaling_alpha"]) == K and len(v.params["scaling_eps"]) == K
    assert any(a is not None for a in vs[-1].params["scaling_alpha"])


def _aioli(vs: list[Version]) -> None:
    probes = [v for v in vs[1:] if v.params["probing"]]
    rounds = [v for v in vs[1:] if not v.params["probing"]]
    assert probes and {v.params["probe_domain"] for v in probes} == {f"d{i}" for i in range(K)}
    assert rounds and len(rounds[0].params["interaction_colsum"]) == K


def _dga(vs: list[Version]) -> None:
    for v in vs[1:]:
        avg = np.asarray(v.params["avg_weights"])
        assert avg.shape == (K,) and abs(avg.sum() - 1.0) < 1e-9


def _toremi(vs: list[Version]) -> None:
    for v in vs[1:]:
        tw = np.asarray(v.params["topic_weights"])
        assert tw.shape == (TOPICS,) and (tw > 0).all()
    # Topic 3 has the highest losses: stage one raises it.
    assert vs[-1].params["topic_weights"][3] > 1.0


def _dwm(vs: list[Version]) -> None:
    from mixer.weighting import dwm

    for v in vs[1:]:
        params, builder = dwm.from_bytes(v.blob)
        assert builder is not None and builder.num_domains == K and builder.num_topics == TOPICS
        assert params["W1"].shape == (builder.num_features, 8)
        assert builder.domain_seen.all()
        np.testing.assert_array_equal(v.weights, vs[0].weights)  # instance weighting leaves the mixture
    assert [v.params["stage"] for v in vs[1:]] == list(range(len(vs) - 1))
    assert vs[-1].params["phi_updates"] > vs[1].params["phi_updates"] > 0
    # The model moved off its uniform start.
    assert np.abs(dwm.from_bytes(vs[-1].blob)[0]["w2"]).max() > 0


def _agent(vs: list[Version]) -> None:
    # One re-weighting step of the agent per validation report, numbered from 1.
    assert [v.params["agent_step"] for v in vs[1:]] == list(range(1, len(vs)))


# name -> (strategy params, extra spec fields, check of the versions' params)
CASES: dict[str, tuple[dict[str, Any], dict[str, Any], Callable[[list[Version]], None]]] = {
    "static": (
        {
            "mode": "schedule",
            "schedule": [
                {"step": 0, "weights": [1, 1, 1]},
                {"step": 10, "weights": [3, 1, 1]},
                {"step": 30, "weights": [1, 1, 4]},
            ],
        },
        {},
        _static,
    ),
    "odm": ({}, {}, _odm),
    "doremi": ({}, {}, _doremi),
    "ado": ({"warmup_steps": 2, "refit_every": 8, "max_points": 16}, {}, _ado),
    "aioli": ({"lp_rounds": 1, "lp_steps": 1, "update_steps": 12}, {}, _aioli),
    "dga": ({}, {}, _dga),
    "toremi": ({"switch_step": 1000, "num_topics": TOPICS}, {}, _toremi),
    "dwm": (
        {"stage_steps": 12},
        {"weighting": {"name": "dwm", "params": {"hidden": 8, "num_topics": TOPICS, "total_steps": STEPS}}},
        _dwm,
    ),
    "agent": ({"model": fresh_model([f"d{i}" for i in range(K)])}, {}, _agent),
}


def make_report(step: int, declared: frozenset[str], rng: np.random.Generator) -> Report:
    """One step's report with exactly the fields behind the declared signal kinds."""
    r = Report(step=step, source="w0")
    # Domain k's loss falls like a power law towards its own floor; domain 2 is the hardest.
    loss = np.array([2.0, 2.5, 3.5]) + np.array([3.0, 2.0, 1.5]) * (step + 1.0) ** -0.4
    if sig.DOMAIN_LOSS in declared or sig.EXCESS_LOSS in declared:
        tokens = np.full(K, 64.0)
        r.domain_token_count = tokens
        r.domain_sample_count = np.full(K, SAMPLES // K, dtype=np.int64)
        if sig.DOMAIN_LOSS in declared:
            r.domain_loss_sum = tokens * loss
        if sig.EXCESS_LOSS in declared:
            r.excess_loss_sum = tokens * np.array([0.1, 0.3, 0.9])
    if sig.VAL_LOSS in declared:
        r.val_loss = loss + 0.2
    if sig.ALIGNMENT in declared:
        r.alignment = np.array([0.5, 1.0, 2.0]) + rng.normal(0.0, 0.1, K)
        r.extra = {"grad_norm_mean": 1.5}
    if sig.SAMPLE_LOSS in declared or sig.SAMPLE_ALIGNMENT in declared:
        domain = rng.integers(0, K, SAMPLES)
        topic = rng.integers(0, TOPICS, SAMPLES)
        r.sample_domain = domain.astype(np.int32)
        r.sample_topic = topic.astype(np.int32)
        r.sample_id = np.arange(SAMPLES, dtype=np.int64) + step * SAMPLES
        r.sample_loss = (loss[domain] + 0.5 * topic + rng.gamma(2.0, 0.2, SAMPLES)).astype(np.float32)
        if sig.SAMPLE_ALIGNMENT in declared:
            # Validation favours the low-loss samples: their gradients align with the target.
            r.sample_align = (2.0 - r.sample_loss + rng.normal(0.0, 0.3, SAMPLES)).astype(np.float32)
    return r


def test_every_registered_strategy_has_a_case() -> None:
    missing = sorted(set(REGISTRY) - set(CASES))
    assert not missing, (
        f"add CASES entries (params that act within {STEPS} steps, params checks) for {missing}"
    )


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_strategy_runs_end_to_end_through_the_service(server, name: str) -> None:
    if name not in CASES:
        pytest.fail(f"strategy {name!r} has no entry in CASES")
    params, extra, check = CASES[name]
    job = f"svc-{name}"
    spec = {
        "name": job,
        "domains": [f"d{i}" for i in range(K)],
        "strategy": {"name": name, "params": params},
        "cadence": CADENCE,
        "seed": 7,
        **extra,
    }
    declared = REGISTRY[name].signals
    rng = np.random.default_rng(0)
    with MixerClient(server.address) as c:
        _, created = c.create_job(spec)
        assert created
        for step in range(STEPS):
            c.report(job, make_report(step, declared, rng))
        versions = c.list_versions(job)

    assert len(versions) >= 3, f"{name}: only {len(versions)} versions from {STEPS} steps"
    assert [v.version for v in versions] == list(range(len(versions)))
    steps = [v.effective_step for v in versions]
    assert steps == sorted(steps)
    for v in versions:
        w = v.weights
        assert w.shape == (K,) and np.isfinite(w).all(), v
        assert abs(w.sum() - 1.0) < 1e-9, w
        assert (w >= CADENCE["min_weight"] - 1e-12).all(), w
    check(versions)

    store = Store(server.db)
    try:
        result = verify(store, job)
    finally:
        store.close()
    assert result.ok, result.to_dict()
    assert result.versions_checked == len(versions) and result.reports == STEPS
