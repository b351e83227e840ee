"""Guardrails against collapse (issue 20), enforced by the engine on every version so a replay
reproduces them: a bound on how far one version moves (cadence.max_step_l1), the floor and cap,
and the starvation detector (cadence.starvation_versions -> params["starving"], and the metric
mixer_starving_domains)."""

from __future__ import annotations

import dataclasses
import json
import math
from itertools import pairwise
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest

from mixer.engine import Engine, at_floor, bound_step, derive_versions, shape_weights
from mixer.replay import verify
from mixer.server.metrics import Metrics
from mixer.signals import MAX_STEP, Report, validate_report
from mixer.spec import CadenceSpec, JobSpec, SpecError, StrategySpec
from mixer.store import Append, LogEntry, Store
from mixer.strategies.base import Decision, Strategy
from mixer.wire import decode_stored, report_to_proto

DOMAINS = ["a", "b", "c", "d"]
TOL = 1e-12


def spec(strategy="static", **cadence) -> JobSpec:
    return JobSpec.from_dict({"name": "g", "domains": DOMAINS, "strategy": strategy, "cadence": {"update_every": 5, **cadence}})


def loss_reports(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for step in range(n):
        tokens = rng.integers(1, 100, 4).astype(np.float64)
        loss = tokens * np.array([1.0, 2.0, 3.0, 4.0]) * rng.uniform(0.8, 1.2, 4)
        yield step, validate_report(Report(step=step, source="w", domain_loss_sum=loss, domain_token_count=tokens), 4)


def bare_reports(n: int):
    for step in range(n):
        yield step, validate_report(Report(step=step, source="w"), 4)


class Proposals(Strategy):
    """Proposes the given weights one after another, one per update (then repeats the last)."""

    name = "proposals"

    def __init__(self, spec: JobSpec, proposals):
        # Stands in for the spec's strategy, whose (written-out) parameters are not this double's.
        super().__init__(dataclasses.replace(spec, strategy=StrategySpec(name=self.name, params={})))
        self.proposals = [np.asarray(p, dtype=np.float64) for p in proposals]

    def init(self, seed: int):
        return {"i": 0}

    def update(self, state, window):
        i = state["i"]
        return {"i": i + 1}, Decision(weights=self.proposals[min(i, len(self.proposals) - 1)])


def run(s: JobSpec, proposals) -> list:
    """Every version an engine with these proposals emits, one update per proposal."""
    eng = Engine(s, Proposals(s, proposals))
    out = [eng.current]
    for seq, r in bare_reports(len(proposals) * s.cadence.update_every):
        if (v := eng.ingest(r, seq)) is not None:
            out.append(v)
    assert len(out) == len(proposals) + 1
    return out


def l1(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).sum())


def check_box(w: np.ndarray, lo: float, hi: float) -> None:
    assert w.sum() == pytest.approx(1.0, abs=1e-12)
    assert (w >= lo - TOL).all() and (w <= hi + TOL).all(), (w, lo, hi)


# -- the movement bound --------------------------------------------------------------------------

@st.composite
def cadences(draw):
    k = draw(st.integers(2, 12))
    lo = draw(st.sampled_from([0.0, 0.5 / k, 1.0 / k, draw(st.floats(0, 1.0 / k))]))
    hi = draw(st.sampled_from([1.0, max(lo, 2.0 / k), max(lo, draw(st.floats(1.0 / k, 1.0)))]))
    bound = draw(st.floats(1e-6, 2.0))
    return k, lo, hi, bound


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cadences(), st.integers(0, 2**32 - 1), st.floats(0.01, 5.0))
def test_every_version_moves_at_most_the_bound_and_keeps_floor_and_cap(cad, seed, concentration):
    """Property: random proposals (sparse to uniform) through the engine; every consecutive pair
    of versions is at most max_step_l1 apart (L1), every version within floor and cap on the
    simplex, a proposal within the bound is served exactly, and a bounded move goes straight
    toward the proposal, exactly as far as allowed."""
    k, lo, hi, bound = cad
    s = JobSpec.from_dict({"name": "g", "domains": [f"d{i}" for i in range(k)], "strategy": "static",
                           "cadence": {"update_every": 1, "min_weight": lo, "max_weight": hi, "max_step_l1": bound}})
    rng = np.random.default_rng(seed)
    proposals = rng.dirichlet(np.full(k, concentration), size=12)
    proposals[rng.random(12) < 0.3] = 0.0  # an all-zero proposal: the prior
    proposals[:, 0] *= rng.random(12) < 0.5  # a domain dropped now and then
    versions = run(s, proposals)
    for prev, v, p in zip(versions, versions[1:], proposals):
        check_box(v.weights, lo, hi)
        shaped = shape_weights(p, np.full(k, 1.0 / k), s.cadence)
        step = l1(prev.weights, v.weights)
        assert step <= bound + 1e-12
        want = l1(prev.weights, shaped)
        if want <= bound:
            assert np.array_equal(v.weights, shaped)
        else:
            assert step == pytest.approx(bound, rel=1e-9, abs=1e-12)
            t = bound / want
            assert np.allclose(v.weights, prev.weights + t * (shaped - prev.weights), rtol=0, atol=1e-12)


@settings(max_examples=300, deadline=None)
@given(st.integers(2, 30), st.integers(0, 2**32 - 1), st.floats(1e-9, 2.0))
def test_bound_step_on_the_simplex(k, seed, bound):
    rng = np.random.default_rng(seed)
    prev, target = rng.dirichlet(np.full(k, 0.3), size=2)
    out = bound_step(prev, target, bound)
    assert l1(prev, out) <= bound + 1e-12
    assert out.sum() == pytest.approx(1.0, abs=1e-12) and (out >= 0).all()
    assert (out >= np.minimum(prev, target)).all() and (out <= np.maximum(prev, target)).all()
    if l1(prev, target) <= bound:
        assert np.array_equal(out, target)
    assert np.array_equal(bound_step(prev, target, None), target)


@pytest.mark.parametrize("k, lo, hi, w", [
    (2, 0.25, 0.5, [0.21128973, 0.78871027]),              # a cap of exactly 1/K: only uniform is left
    (3, 0.0, 1 / 3, [0.0, 0.59301806, 0.01151995]),
    (5, 0.2, 1.0, [0.0, 0.1, 0.1, 0.1, 0.7]),              # a floor of exactly 1/K (it was ignored)
    (10, 0.1, 1.0, [i / 9 for i in range(10)]),
    (12, 0.0, 1 / 6, [0.0, 2.26e-9, 5.66e-19, 1.0, 1.33e-35, 9.31e-70, 1.27e-111, 4.82e-93, 1.77e-11, 9.56e-16, 2.68e-17, 0.0]),
    (8, 0.0, 0.125000125, [2.0e-14, 1.5e-30, 0.085, 0.836, 1.8e-3, 1e-40, 7e-2, 7e-3]),  # a cap just above 1/K
])
def test_shaping_keeps_floor_cap_and_sum_at_the_limits(k, lo, hi, w):
    """The floor and cap the spec allows at their limits (1/K), and proposals spanning a hundred
    orders of magnitude: the shaped weights still sum to 1 within floor and cap (they did not)."""
    out = shape_weights(np.array(w, dtype=np.float64), np.full(k, 1.0 / k), CadenceSpec(min_weight=lo, max_weight=hi))
    check_box(out, lo, hi)


def test_without_a_bound_versions_are_the_proposals():
    s = spec(min_weight=0.05)
    proposals = [[1, 0, 0, 0], [0, 0, 0, 1], [0.25, 0.25, 0.25, 0.25]]
    for v, p in zip(run(s, proposals)[1:], proposals):
        assert np.array_equal(v.weights, shape_weights(np.asarray(p, float), np.full(4, 0.25), s.cadence))


def test_a_bounded_move_keeps_going_until_it_reaches_the_proposal():
    """A static schedule changes its weights once (one decision): the bounded versions still walk
    all the way there, one bounded step per update, and then stop."""
    s = JobSpec.from_dict({"name": "g", "domains": DOMAINS, "strategy": {"name": "static", "params": {
        "mode": "schedule", "schedule": [{"step": 0, "weights": [1, 1, 1, 1]}, {"step": 20, "weights": [0, 0, 0, 1]}]}},
        "cadence": {"update_every": 5, "max_step_l1": 0.2, "min_weight": 0.05}})
    versions = derive_versions(s, bare_reports(200))
    target = shape_weights(np.array([0.0, 0, 0, 1]), np.full(4, 0.25), s.cadence)
    d = l1(versions[0].weights, target)  # 0.6 + 0.6 = 1.2: six steps of 0.2
    assert len(versions) == 1 + math.ceil(d / 0.2 - 1e-9)
    assert [v.trigger_step for v in versions[1:]] == [24, 29, 34, 39, 44, 49]
    for a, b in pairwise(versions):
        assert l1(a.weights, b.weights) <= 0.2 + 1e-12
        check_box(b.weights, 0.05, 1.0)
    assert np.array_equal(versions[-1].weights, target)


def test_the_bound_is_applied_after_floor_cap_and_smoothing():
    s = spec(min_weight=0.1, max_weight=0.5, prior_smoothing=0.2, max_step_l1=0.05)
    versions = run(s, [[1, 0, 0, 0]] * 30)
    target = shape_weights(np.array([1.0, 0, 0, 0]), np.full(4, 0.25), s.cadence)
    for a, b in pairwise(versions):
        assert l1(a.weights, b.weights) <= 0.05 + 1e-12
        check_box(b.weights, 0.1, 0.5)
    assert np.array_equal(versions[-1].weights, target)


# -- starvation ----------------------------------------------------------------------------------

def test_starvation_flagged_after_exactly_n_versions_at_the_floor_and_cleared_on_recovery():
    s = spec(min_weight=0.05, starvation_versions=3)
    down, up = [0, 1, 1, 1], [1, 1, 1, 1]
    versions = run(s, [down] * 5 + [up] + [down] * 2 + [[1, 0, 1, 1]] * 3)
    assert [v.params["starving"] for v in versions] == [
        [],                        # v0: the prior, nobody at the floor
        [], [], [0], [0], [0],     # domain 0 at the floor from v1: flagged at its third version (v3)
        [],                        # recovered: cleared at once
        [], [],                    # at the floor again for two versions: not yet
        [], [], [1],               # domain 1 at the floor, domain 0 recovered (its count restarts)
    ]
    assert all(at_floor(versions[i].weights, 0.05)[0] for i in (1, 2, 3, 4, 5, 7, 8))


def test_starvation_with_n_1_and_no_floor_and_from_the_first_version():
    # With no floor, "at the floor" is a weight below 1e-12; N = 1 flags the first such version.
    s = spec(starvation_versions=1)
    assert [v.params["starving"] for v in run(s, [[0, 1, 1, 1], [1e-3, 1, 1, 1], [0, 0, 1, 1]])] == [[], [0], [], [0, 1]]
    # A prior that puts a domain at the floor counts from version 0.
    s = JobSpec.from_dict({"name": "g", "domains": [{"name": "a", "weight": 0}, "b", "c"], "strategy": "static",
                           "cadence": {"starvation_versions": 2}})
    assert [v.params["starving"] for v in derive_versions(s, [])] == [[]]
    assert [v.params["starving"] for v in run(s, [[0, 1, 1]])] == [[], [0]]


def test_a_bounded_walk_toward_the_floor_counts_only_the_versions_that_reach_it():
    s = spec(min_weight=0.05, max_step_l1=0.1, starvation_versions=2)
    versions = run(s, [[0, 1, 1, 1]] * 8)
    first = next(i for i, v in enumerate(versions) if at_floor(v.weights, 0.05)[0])
    assert first == 4  # 0.25 -> 0.05 is 0.2 of domain 0 plus 0.2 spread over the others: 0.4 / 0.1
    assert [bool(v.params["starving"]) for v in versions] == [i > first for i in range(len(versions))]


def test_defaults_keep_todays_versions_specs_and_snapshots():
    s = spec("odm")
    assert s.cadence.max_step_l1 is None and s.cadence.starvation_versions is None
    stored = json.loads(s.to_json())["cadence"]
    assert "max_step_l1" not in stored and "starvation_versions" not in stored  # old fingerprints stay
    versions = derive_versions(s, loss_reports(100))
    assert all("starving" not in v.params for v in versions)
    eng = Engine(s)
    for seq, r in loss_reports(100):
        eng.ingest(r, seq)
    snap = json.loads(eng.snapshot())
    assert "target" not in snap and "floor_run" not in snap
    pinned = JobSpec.from_dict({**json.loads(s.to_json()), "cadence": {**stored, "max_step_l1": 0.5, "starvation_versions": 4}})
    assert json.loads(pinned.to_json())["cadence"]["max_step_l1"] == 0.5
    assert json.loads(pinned.to_json())["cadence"]["starvation_versions"] == 4
    assert pinned.fingerprint() != s.fingerprint()


# -- replay and restart reproduce them ------------------------------------------------------------

SCHEDULE = [{"step": 0, "weights": [1, 1, 1, 1]}] + [
    {"step": 20 * i, "weights": [0, 1, 1 + i / 10, 1] if i < 8 else [2, 1, 1, 1]} for i in range(1, 10)
]


def guarded_spec(strategy: str) -> JobSpec:
    cad = {"update_every": 5, "min_weight": 0.05, "max_weight": 0.6, "max_step_l1": 0.15, "starvation_versions": 3}
    if strategy == "odm":
        return JobSpec.from_dict({"name": "g", "domains": DOMAINS, "strategy": "odm", "cadence": {**cad, "max_step_l1": 0.01}})
    return JobSpec.from_dict({"name": "g", "domains": DOMAINS, "cadence": cad,
                              "strategy": {"name": "static", "params": {"mode": "schedule", "schedule": SCHEDULE}}})


@pytest.mark.parametrize("strategy", ["static", "odm"])
def test_replay_and_restore_reproduce_bound_and_starvation(strategy):
    s = guarded_spec(strategy)
    log = list(loss_reports(260))
    full = derive_versions(s, log)
    assert len(full) > 10
    again = derive_versions(s, log)
    assert len(again) == len(full) and all(a.same_as(b) for a, b in zip(full, again))
    bounded = sum(1 for a, b in pairwise(full) if l1(a.weights, b.weights) == pytest.approx(s.cadence.max_step_l1))
    assert bounded >= 3, "the bound never acted: the test would prove nothing"
    if s.strategy.name == "static":
        assert any(v.params["starving"] == [0] for v in full) and full[-1].params["starving"] == []
    for cut in (7, 33, 101, 180):
        eng = Engine(s)
        out = [eng.current]
        for seq, r in log[:cut]:
            if (v := eng.ingest(r, seq)) is not None:
                out.append(v)
        eng = Engine.restore(s, eng.snapshot())
        for seq, r in log[cut:]:
            if (v := eng.ingest(r, seq)) is not None:
                out.append(v)
        assert len(out) == len(full) and all(a.same_as(b) for a, b in zip(out, full)), cut


def test_stored_versions_verify_by_replay(tmp_path):
    """Written to a store as the server writes them (log, versions, snapshots), the versions
    with their `starving` entries come back equal, `mixer replay`'s verify finds no divergence,
    and a restart (newest snapshot + log tail) continues exactly."""
    s = guarded_spec("static")
    store = Store(str(tmp_path / "m.db"))
    rec, _ = store.create_job(s.name, s.to_json(), s.fingerprint(), s.strategy.name)
    eng = Engine(s)
    emitted = [eng.current]
    store.append([Append(rec.id, versions=[eng.current], snapshot=(0, -1, eng.snapshot()))])
    log = list(loss_reports(260))
    for seq, r in log[:150]:
        v = eng.ingest(r, seq)
        app = Append(rec.id, signals=[LogEntry(seq, r.step, r.source, r.seq, r.applied_version, r.num_samples,
                                               report_to_proto(r).SerializeToString())])
        if v is not None:
            emitted.append(v)
            app.versions.append(v)
            if v.version % 2 == 0:
                app.snapshot = (v.version, seq, eng.snapshot())
        store.append([app])
    stored = [v for v, _ in store.versions(rec.id)]
    assert len(stored) == len(emitted) and all(a.same_as(b) for a, b in zip(stored, emitted))
    assert any(v.params["starving"] for v in stored)
    result = verify(store, s.name)
    assert result.ok and result.versions_checked == len(emitted), result.to_dict()
    _, _, snap = store.latest_snapshot(rec.id)
    restarted = Engine.restore(s, snap)
    for r in store.signals(rec.id, after_seq=restarted.last_log_seq):
        restarted.ingest(decode_stored(r.payload, 4), r.seq, guard=False)
    cont = [restarted.ingest(r, seq) for seq, r in log[150:]]
    full = derive_versions(s, log)
    tail = [v for v in cont if v is not None]
    assert all(a.same_as(b) for a, b in zip(tail, full[len(emitted):])) and len(tail) == len(full) - len(emitted)
    store.close()


# -- the spec --------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("max_step_l1", 0), ("max_step_l1", -0.1), ("max_step_l1", 2.0001), ("max_step_l1", math.nan),
    ("max_step_l1", math.inf), ("max_step_l1", True), ("max_step_l1", "0.1"),
    ("starvation_versions", 0), ("starvation_versions", -3), ("starvation_versions", 2.0),
    ("starvation_versions", True), ("starvation_versions", MAX_STEP), ("starvation_versions", "5"),
])
def test_guardrail_settings_out_of_range_name_the_field(field, value):
    with pytest.raises(SpecError) as e:
        spec(**{field: value})
    assert e.value.field == f"cadence.{field}"


@pytest.mark.parametrize("field, value", [("max_step_l1", 1e-9), ("max_step_l1", 2), ("max_step_l1", 0.1),
                                          ("starvation_versions", 1), ("starvation_versions", 10_000)])
def test_guardrail_settings_in_range(field, value):
    assert getattr(spec(**{field: value}).cadence, field) == value


def test_yaml_spec_with_guardrails():
    s = JobSpec.from_yaml("name: g\ndomains: [a, b]\ncadence: {min_weight: 0.1, max_step_l1: 5e-2, starvation_versions: 20}\n")
    assert s.cadence == CadenceSpec(min_weight=0.1, max_step_l1=0.05, starvation_versions=20)


# -- the metric ------------------------------------------------------------------------------------

def scrape(runtimes) -> str:
    return generate_latest(Metrics(lambda: runtimes).registry).decode()


def runtime(s: JobSpec, versions) -> SimpleNamespace:
    eng = SimpleNamespace(current=versions[-1], max_step=10)
    return SimpleNamespace(job=SimpleNamespace(name=s.name, status="active"), spec=s, engine=eng, last_loss=None,
                           applied_lag=0, report_count=1, sample_count=1, duplicate_count=0)


def test_starving_domains_metric_per_job_and_domain_from_live_state():
    s = spec(min_weight=0.05, starvation_versions=2)
    versions = run(s, [[0, 1, 1, 1]] * 3)
    text = scrape([runtime(s, versions)])
    assert 'mixer_starving_domains{domain="a",job="g"} 1.0' in text
    for d in "bcd":
        assert f'mixer_starving_domains{{domain="{d}",job="g"}} 0.0' in text
    recovered = run(s, [[0, 1, 1, 1]] * 3 + [[1, 1, 1, 1]])
    assert 'mixer_starving_domains{domain="a",job="g"} 0.0' in scrape([runtime(s, recovered)])
    # No detector, no series; a job no longer live leaves none either.
    plain = spec()
    assert "mixer_starving_domains{" not in scrape([runtime(plain, [Engine(plain).current])])
    assert "mixer_starving_domains{" not in scrape([])
