"""The engine: cadence, shaping, determinism, snapshot/restore."""

from __future__ import annotations

import numpy as np
import pytest

from mixer.engine import Engine, derive_versions, shape_weights
from mixer.signals import Report, validate_report
from mixer.spec import CadenceSpec, JobSpec


def job(**cadence) -> JobSpec:
    return JobSpec.from_dict(
        {
            "name": "j",
            "domains": ["a", "b", "c", "d"],
            "strategy": "odm",
            "cadence": {"update_every": 5, **cadence},
        }
    )


def reports(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for step in range(n):
        tokens = rng.integers(1, 100, 4).astype(np.float64)
        loss = tokens * np.array([1.0, 2.0, 3.0, 4.0]) * rng.uniform(0.8, 1.2, 4)
        yield (
            step,
            validate_report(
                Report(step=step, source="w", domain_loss_sum=loss, domain_token_count=tokens), 4
            ),
        )


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


def floor_cases():
    """(w, lo) from exact arithmetic only (uniform doubles, products, floors): the same inputs on any machine."""
    rng = np.random.default_rng(18)
    for k in (2, 3, 7, 8, 9, 22, 40, 64, 65, 130):
        for i in range(120):
            u = rng.random(k)
            kind = i % 4
            if kind == 0:
                w = u * u * u * u  # spread over orders of magnitude
            elif kind == 1:
                w = np.floor(u * 4.0)  # ties and zeros
                w[0] += 1.0
            elif kind == 2:
                w = u * (rng.random(k) < 0.3)  # most domains empty
                w[k - 1] += 1e-300
            else:
                w = u
            w = w / w.sum()
            for lo in (0.5 / k * rng.random(), 0.999 / k, 0.01 if k < 100 else 0.001):
                yield w, lo


FLOOR_DIGEST = "c42c85b7bfc541116689d0b678eabf7b208d607f787979f8ee865b16b8d77734"
"""sha256 of the bytes of shape_weights over floor_cases(), as the vector-only projection (commit
f0464bd) computed them: stored versions replay bit for bit only while this holds."""


def test_floor_projection_returns_the_bits_it_always_did():
    import hashlib

    digest, bound = hashlib.sha256(), 0
    for w, lo in floor_cases():
        out = shape_weights(w, np.full(w.size, 1.0 / w.size), CadenceSpec(min_weight=lo))
        bound += bool((out <= lo).any() and not np.array_equal(out, w))
        digest.update(out.tobytes())
    assert bound == 3200  # the floor binds in most cases: the projection, not the early return, is checked
    assert digest.hexdigest() == FLOOR_DIGEST


def test_floor_projection_loop_and_vector_paths_agree_bit_for_bit():
    from mixer.shaping import (
        FLOOR_LOOP_MAX_DOMAINS,
        _floored_simplex,
        _floored_simplex_loop,
        _floored_simplex_vector,
    )

    rng = np.random.default_rng(7)
    checked = 0
    for k in (2, 5, 8, 9, 17, 22, FLOOR_LOOP_MAX_DOMAINS):
        for i in range(400):
            w = rng.dirichlet(np.full(k, [0.05, 0.3, 2.0][i % 3]))
            at = rng.integers(k, size=i % 4)
            w[at[at != np.argmax(w)]] = [0.0, -0.0, 5e-324, w.max()][i % 4]  # zeros, a denormal, ties
            w /= w.sum()
            lo = rng.uniform(0.0, 1.0 / k)
            want = _floored_simplex_vector(w, lo)
            assert (
                _floored_simplex_loop(w, lo).tobytes() == want.tobytes() == _floored_simplex(w, lo).tobytes()
            ), (k, lo, w)
            checked += 1
    assert checked == 7 * 400
