"""The engine: cadence, shaping, determinism, snapshot/restore."""

from __future__ import annotations

import numpy as np
import pytest

from mixer.engine import Engine, derive_versions, shape_weights
from mixer.signals import Report, validate_report
from mixer.spec import CadenceSpec, JobSpec


def job(**cadence) -> JobSpec:
    return JobSpec.from_dict({"name": "j", "domains": ["a", "b", "c", "d"], "strategy": "odm", "cadence": {"update_every": 5, **cadence}})


def reports(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for step in range(n):
        tokens = rng.integers(1, 100, 4).astype(np.float64)
        loss = tokens * np.array([1.0, 2.0, 3.0, 4.0]) * rng.uniform(0.8, 1.2, 4)
        yield step, validate_report(Report(step=step, source="w", domain_loss_sum=loss, domain_token_count=tokens), 4)


def test_updates_follow_the_cadence_and_take_effect_after_the_delay():
    versions = derive_versions(job(delay=2, warmup_steps=10), reports(40))
    assert [v.trigger_step for v in versions[1:]] == [14, 19, 24, 29, 34, 39]
    assert all(v.effective_step == v.trigger_step + 2 for v in versions[1:])
    assert [v.version for v in versions] == list(range(len(versions)))


def test_same_log_same_versions():
    a = derive_versions(job(), reports(100))
    b = derive_versions(job(), reports(100))
    assert len(a) == len(b) and all(x.same_as(y) for x, y in zip(a, b))


@pytest.mark.parametrize("cut", [3, 17, 50])
def test_snapshot_restore_continues_identically(cut):
    spec = job()
    full = derive_versions(spec, reports(80))
    eng = Engine(spec)
    out = [eng.current]
    log = list(reports(80))
    for seq, r in log[:cut]:
        if (v := eng.ingest(r, seq)) is not None:
            out.append(v)
    eng = Engine.restore(spec, eng.snapshot())
    for seq, r in log[cut:]:
        if (v := eng.ingest(r, seq)) is not None:
            out.append(v)
    assert len(out) == len(full) and all(x.same_as(y) for x, y in zip(out, full))


def test_restore_refuses_another_spec():
    eng = Engine(job())
    with pytest.raises(ValueError, match="fingerprint"):
        Engine.restore(job(update_every=7), eng.snapshot())


def test_log_order_is_enforced():
    eng = Engine(job())
    _, r = next(reports(1))
    eng.ingest(r, 5)
    with pytest.raises(ValueError, match="log order"):
        eng.ingest(r, 5)


@pytest.mark.parametrize("lo, hi", [(0.1, 1.0), (0.0, 0.4), (0.05, 0.3), (0.25, 0.25)])
def test_shape_weights_respects_floor_and_cap(lo, hi):
    rng = np.random.default_rng(1)
    for _ in range(200):
        w = rng.dirichlet(np.full(4, 0.2))
        out = shape_weights(w, np.full(4, 0.25), CadenceSpec(min_weight=lo, max_weight=hi))
        assert out.sum() == pytest.approx(1.0)
        assert (out >= lo - 1e-12).all() and (out <= hi + 1e-12).all()


def test_prior_smoothing_mixes_the_prior_back():
    out = shape_weights(np.array([1.0, 0, 0, 0]), np.full(4, 0.25), CadenceSpec(prior_smoothing=0.2))
    assert out == pytest.approx([0.85, 0.05, 0.05, 0.05])


def test_odm_favours_the_high_loss_domain():
    last = derive_versions(job(), reports(300))[-1]
    assert int(np.argmax(last.weights)) == 3


def test_floor_only_path_matches_the_general_projection():
    from mixer.shaping import _box_simplex, _floored_simplex

    rng = np.random.default_rng(3)
    for k in (2, 5, 22, 200):
        for _ in range(300):
            w = rng.dirichlet(np.full(k, 0.3))
            w[rng.integers(k)] = 0.0
            w /= w.sum()
            lo = rng.uniform(0, 1 / k)
            assert np.allclose(_floored_simplex(w, lo), _box_simplex(w, lo, 1.0), rtol=0, atol=1e-15)
