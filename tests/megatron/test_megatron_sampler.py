"""MixtureSampler: exact rates, zero weights, live changes, resumable state."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mixer.megatron.sampler import (
    FingerprintMismatchError,
    MixtureSampler,
    fingerprint,
    make_sample_id,
    quantize_weights,
    split_sample_id,
)


def draw(sampler: MixtureSampler, steps: int) -> np.ndarray:
    """Domain of every draw of the next `steps` global batches."""
    out: list[int] = []
    for _ in range(steps):
        out += [d for d, _ in sampler.next_global_batch(sampler.step)]
    return np.asarray(out)


def window_error(seq: np.ndarray, weights: np.ndarray) -> float:
    """max over domains and windows [a, b) of |count_i - (b - a) w_i|."""
    worst = 0.0
    for i, w in enumerate(weights):
        credit = np.concatenate([[0], np.cumsum(seq == i)]) - np.arange(len(seq) + 1) * w
        worst = max(worst, float(credit.max() - credit.min()))
    return worst


def random_weights(rng: np.random.Generator, k: int) -> np.ndarray:
    """Dirichlet weights, sometimes very uneven."""
    return rng.dirichlet(np.ones(k) * rng.choice([0.1, 1.0, 5.0]))


def test_two_domains_every_window_within_one() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        w = random_weights(rng, 2)
        s = MixtureSampler(2, 16, w, fingerprint="t")
        assert window_error(draw(s, 40), s.weights) <= 1 + 1e-9


@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [0.5, 0.25, 0.25], [0.25] * 4, [0.4, 0.4, 0.2]])
def test_simple_weights_every_window_within_one(weights: list[float]) -> None:
    s = MixtureSampler(len(weights), 16, weights, fingerprint="t")
    assert window_error(draw(s, 40), s.weights) <= 1 + 1e-9


def test_many_domains_every_window_within_two() -> None:
    # Within 1 for every window is impossible for K >= 3 with generic weights (Fraenkel), see module doc.
    rng = np.random.default_rng(1)
    for _ in range(60):
        k = int(rng.integers(3, 9))
        w = random_weights(rng, k)
        s = MixtureSampler(k, 16, w, fingerprint="t")
        assert window_error(draw(s, 40), s.weights) < 2


def test_exact_batches_when_weights_are_multiples_of_one_over_batch() -> None:
    counts = np.array([7, 4, 3, 1, 1, 0])
    s = MixtureSampler(6, 16, counts / 16, fingerprint="t")
    for _ in range(30):
        batch = [d for d, _ in s.next_global_batch(s.step)]
        assert np.bincount(batch, minlength=6).tolist() == counts.tolist()


def test_zero_weight_never_picked() -> None:
    s = MixtureSampler(4, 16, [0.5, 0.0, 0.3, 0.2], fingerprint="t")
    assert 1 not in draw(s, 50)
    # A domain dropped to zero keeps its credit but must still never be picked.
    s = MixtureSampler(3, 16, [0.2, 0.79, 0.01], fingerprint="t")
    draw(s, 3)
    s.set_weights([0.5, 0.0, 0.5], version=1, effective_step=s.step)
    assert 1 not in draw(s, 50)


def test_tiny_weight_gets_its_share() -> None:
    s = MixtureSampler(3, 20, [0.01, 0.495, 0.495], fingerprint="t")
    seq = draw(s, 100)  # 2000 draws: exactly 20 from the tiny domain
    assert (seq == 0).sum() == 20
    assert window_error(seq, s.weights) < 2
    # It shows up within its first 100 draws and then every 100 +- 1 draws, never in bursts.
    picks = np.flatnonzero(seq == 0)
    assert picks[0] < 100 and np.all(np.abs(np.diff(picks) - 100) <= 1)


def test_weight_change_mid_run_keeps_rates() -> None:
    rng = np.random.default_rng(2)
    for k in (2, 3, 5, 8):
        for _ in range(15):
            s = MixtureSampler(k, 16, random_weights(rng, k), fingerprint="t")
            draw(s, 7)
            new = random_weights(rng, k)
            if rng.random() < 0.5:
                new[rng.integers(k)] = 0.0
            assert s.set_weights(new, version=1, effective_step=10)
            before = draw(s, 3)  # steps 7..9 still use version 0
            assert s.version == 0 and len(before) == 48
            after = draw(s, 40)
            assert s.version == 1 and s.applied[-1] == (1, 10)
            w = s.weights
            assert all((after == i).sum() == 0 for i in range(k) if w[i] == 0)
            bound = 1 + 1e-9 if k == 2 else 2
            assert window_error(after, w) <= bound


def test_versions_stale_late_and_superseded() -> None:
    s = MixtureSampler(2, 4, [1, 0], fingerprint="t")
    draw(s, 5)
    assert s.set_weights([0, 1], version=3, effective_step=2)  # late: applies at the next step
    assert not s.set_weights([1, 1], version=3, effective_step=9)  # repeated version: ignored
    assert not s.set_weights([1, 1], version=2, effective_step=9)  # older version: ignored
    assert set(draw(s, 1)) == {1} and s.applied[-1] == (3, 5)
    # v5 is due earlier than v4: once v5 applies, v4 must never resurface.
    assert s.set_weights([1, 0], version=4, effective_step=20)
    assert s.set_weights([1, 1], version=5, effective_step=8)
    draw(s, 20)
    assert s.version == 5 and [v for v, _ in s.applied] == [0, 3, 5]


def test_step_must_follow_sequence() -> None:
    s = MixtureSampler(2, 4, [1, 1], fingerprint="t")
    with pytest.raises(ValueError, match="at step 0"):
        s.next_global_batch(3)


def test_cursors_advance_and_wrap() -> None:
    s = MixtureSampler(2, 4, [0.5, 0.5], fingerprint="t", dataset_lengths=[3, 5])
    keys = [k for _ in range(4) for k in s.next_global_batch(s.step)]
    assert [i for d, i in keys if d == 0] == [0, 1, 2, 0, 1, 2, 0, 1]
    assert [i for d, i in keys if d == 1] == [0, 1, 2, 3, 4, 0, 1, 2]
    assert s.drawn.tolist() == [8, 8]


def test_rank_slices_cover_the_global_batch() -> None:
    w = [0.6, 0.3, 0.1]
    full = MixtureSampler(3, 12, w, fingerprint="t")
    ranks = [MixtureSampler(3, 12, w, fingerprint="t", dp_rank=r, dp_size=3) for r in range(3)]
    for step in range(5):
        batch = full.next_global_batch(step)
        parts = [r.rank_slice(r.next_global_batch(step)) for r in ranks]
        assert [k for p in parts for k in p] == batch and all(len(p) == 4 for p in parts)
    with pytest.raises(ValueError, match="divisible"):
        MixtureSampler(3, 10, w, fingerprint="t", dp_size=3)


def test_state_roundtrip_gives_identical_sequence() -> None:
    rng = np.random.default_rng(3)
    s = MixtureSampler(5, 16, random_weights(rng, 5), fingerprint="spec-a", dataset_lengths=[50] * 5)
    draw(s, 6)
    s.set_weights(random_weights(rng, 5), version=1, effective_step=9)  # still pending at save
    state = json.loads(json.dumps(s.state_dict()))  # plain types only
    later = [s.next_global_batch(s.step) for _ in range(12)]
    resumed = MixtureSampler(5, 16, [1] * 5, fingerprint="spec-a", dataset_lengths=[50] * 5)
    resumed.load_state_dict(state)
    assert resumed.step == 6 and resumed.version == 0
    assert [resumed.next_global_batch(resumed.step) for _ in range(12)] == later
    assert resumed.state_dict() == s.state_dict()


def test_fingerprint_mismatch_refused_unless_forced() -> None:
    spec_a, spec_b = fingerprint({"domains": ["a", "b"]}), fingerprint({"domains": ["a", "c"]})
    assert spec_a == fingerprint({"domains": ["a", "b"]}) and spec_a != spec_b
    s = MixtureSampler(2, 8, [0.5, 0.5], fingerprint=spec_a)
    draw(s, 3)
    other = MixtureSampler(2, 8, [0.5, 0.5], fingerprint=spec_b)
    with pytest.raises(FingerprintMismatchError, match="force=True") as info:
        other.load_state_dict(s.state_dict())
    assert isinstance(info.value, ValueError)
    assert other.step == 0  # nothing was loaded
    other.load_state_dict(s.state_dict(), force=True)
    assert other.step == 3
    with pytest.raises(ValueError, match="domains"):
        MixtureSampler(3, 8, [1, 1, 1], fingerprint=spec_a).load_state_dict(s.state_dict(), force=True)


def test_invalid_weights_rejected() -> None:
    for bad in ([0, 0], [1, -1], [1, float("nan")], [1, 2, 3]):
        with pytest.raises(ValueError):
            MixtureSampler(2, 4, bad, fingerprint="t")


def test_quantized_weights_sum_exactly_and_keep_tiny_domains() -> None:
    q = quantize_weights([1e-15, 0.3, 0.7, 0.0])
    assert q.sum() == quantize_weights([1.0]).sum()
    assert q[0] >= 1 and q[3] == 0


def test_sample_id_roundtrip() -> None:
    sid = make_sample_id(7, 123_456_789)
    assert split_sample_id(sid) == (7, 123_456_789)
    assert sid < 2**63
