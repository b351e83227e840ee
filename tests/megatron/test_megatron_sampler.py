"""MixtureSampler: exact rates, zero weights, live changes, resumable state, the vectorised draw."""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pytest

from mixer.megatron.sampler import (
    _SCALE,
    FingerprintMismatchError,
    MixtureSampler,
    fingerprint,
    make_sample_id,
    mixture_tree,
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


def tree_bound(weights: np.ndarray) -> float:
    """The proven window bound for fixed weights: max over domains of 1 + sum of w_i / w_a over
    the domain's ancestors a in mixture_tree, the root excepted."""
    units = [int(u) for u in quantize_weights(weights)]
    k = len(units)
    root, left, right = mixture_tree(units)
    weight = units + [0] * len(left)
    for j, (a, b) in enumerate(zip(left, right)):
        weight[k + j] = weight[a] + weight[b]
    worst, stack = 0.0, [(root, 0.0)]
    while stack:
        v, inverse_sum = stack.pop()
        if v < k:
            worst = max(worst, 1 + weight[v] * inverse_sum)
            continue
        for child in (left[v - k], right[v - k]):
            stack.append((child, inverse_sum + (1 / weight[child] if child >= k else 0.0)))
    return worst


def test_two_domains_every_window_within_one() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        w = random_weights(rng, 2)
        s = MixtureSampler(2, 16, w, fingerprint="t")
        assert window_error(draw(s, 40), s.weights) <= 1 + 1e-9


@pytest.mark.parametrize("weights", [[0.5, 0.25, 0.25], [0.25] * 4, [0.4, 0.4, 0.2]])
def test_simple_weights_every_window_within_one(weights: list[float]) -> None:
    s = MixtureSampler(len(weights), 16, weights, fingerprint="t")
    assert window_error(draw(s, 40), s.weights) <= 1 + 1e-9


def test_small_denominator_weights_stay_close() -> None:
    # (0.5, 0.3, 0.2) was within 1 under smooth weighted round-robin; the rotation tree gives 1.1
    # (bound 1.6), and no binary tree of rotations gets (0.6, 0.3, 0.1) within 1 (1.2 at best).
    for weights, measured in (([0.5, 0.3, 0.2], 1.1), ([0.6, 0.3, 0.1], 1.2), ([0.7, 0.2, 0.1], 1.2)):
        s = MixtureSampler(3, 10, weights, fingerprint="t")
        error = window_error(draw(s, 40), s.weights)
        assert error <= measured + 1e-9 and error < tree_bound(s.weights)


def test_many_domains_every_window_within_the_tree_bound() -> None:
    # Within 1 for every window is impossible for K >= 3 with generic weights (Fraenkel), see
    # module doc. The bound is proven per tree; measured window errors stay below 2.5 (module doc).
    rng = np.random.default_rng(1)
    for _ in range(60):
        k = int(rng.integers(3, 9))
        w = random_weights(rng, k)
        s = MixtureSampler(k, 16, w, fingerprint="t")
        error = window_error(draw(s, 40), s.weights)
        assert error < tree_bound(s.weights) + 1e-9 and error < 3


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
            # Right after a change the tree is rebuilt and owed draws are paid back first: measured
            # up to 0.25 above the fixed-weights bound (two domains stay one rotation, within 1).
            bound = 1 + 1e-9 if k == 2 else tree_bound(w) + 0.5
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


class PlainRotationTree:
    """The interleaver's rule, one draw at a time, in exact fractions: a slow reference.

    Credits are in draws. A draw walks down mixture_tree from the root; at a node it goes to the
    left child a when z + w_a / w_v >= 1/2, where z = C_a - (w_a / w_v) C_v and C sums the credits
    below a node. Then every positive-weight domain gains its weight and the drawn one loses 1.
    """

    def __init__(self, k: int, weights: np.ndarray, lengths: list[int] | None = None) -> None:
        self.k = k
        self.lengths = lengths
        self.credits = [Fraction(0)] * k
        self.drawn = [0] * k
        self.set_weights(weights)

    def set_weights(self, weights: np.ndarray) -> None:
        units = [int(u) for u in quantize_weights(np.asarray(weights) / np.sum(weights))]
        self.w = [Fraction(u, _SCALE) for u in units]
        self.root, self.left, self.right = mixture_tree(units)

    def below(self, v: int) -> list[int]:
        if v < self.k:
            return [v]
        return self.below(self.left[v - self.k]) + self.below(self.right[v - self.k])

    def draw(self) -> tuple[int, int]:
        v = self.root
        while v >= self.k:
            a = self.left[v - self.k]
            share = sum(self.w[i] for i in self.below(a)) / sum(self.w[i] for i in self.below(v))
            z = sum(self.credits[i] for i in self.below(a)) - share * sum(
                self.credits[i] for i in self.below(v)
            )
            v = a if z + share >= Fraction(1, 2) else self.right[v - self.k]
        self.credits = [c + w for c, w in zip(self.credits, self.w)]
        self.credits[v] -= 1
        index = self.drawn[v] if self.lengths is None else self.drawn[v] % self.lengths[v]
        self.drawn[v] += 1
        return v, index


def reference_weights(rng: np.random.Generator, k: int) -> np.ndarray:
    """Uneven, aligned (exact ties), geometric (deep trees) or with zeros."""
    kind = rng.integers(4)
    if kind == 0:
        return random_weights(rng, k)
    if kind == 1:
        return rng.integers(0, 5, k) + np.eye(k)[0]
    if kind == 2:
        return rng.permutation(2.0 ** -np.arange(k))
    w = random_weights(rng, k)
    w[rng.choice(k, size=int(rng.integers(1, k)), replace=False)] = 0.0
    return w


def test_vectorised_draw_equals_the_plain_reference() -> None:
    rng = np.random.default_rng(7)
    for case in range(40):
        k = int(rng.integers(2, 10))
        batch = int(rng.choice([1, 3, 8, 16]))
        lengths = [int(n) for n in rng.integers(1, 30, k)] if case % 2 else None
        w = reference_weights(rng, k)
        s = MixtureSampler(k, batch, w, fingerprint="t", dataset_lengths=lengths)
        ref = PlainRotationTree(k, w, lengths)
        pending: list[tuple[int, int, np.ndarray]] = []
        for step in range(24):
            if rng.random() < 0.3:
                # Due now or a few steps ahead; a newer version due first supersedes older ones.
                w, effective = reference_weights(rng, k), step + int(rng.integers(0, 3))
                pending.append((effective, step + 1, w))
                assert s.set_weights(w, version=step + 1, effective_step=effective)
            due = [p for p in pending if p[0] <= step]
            if due:
                _, newest, weights = max(due, key=lambda p: p[1])
                pending = [p for p in pending if p[1] > newest]
                ref.set_weights(weights)
            expected = [ref.draw() for _ in range(batch)]
            assert s.next_global_batch(step) == expected, (case, step)
        assert s.credits.tolist() == [int(c * _SCALE) for c in ref.credits]


def test_global_arrays_are_the_batch_as_int64() -> None:
    a = MixtureSampler(5, 64, [0.4, 0.3, 0.2, 0.1, 0.0], fingerprint="t", dataset_lengths=[7] * 5)
    b = MixtureSampler(5, 64, [0.4, 0.3, 0.2, 0.1, 0.0], fingerprint="t", dataset_lengths=[7] * 5)
    for step in range(5):
        domains, indices = a.next_global_arrays(step)
        assert domains.dtype == indices.dtype == np.int64
        assert list(zip(domains.tolist(), indices.tolist())) == b.next_global_batch(step)


def test_two_domains_draw_what_smooth_weighted_round_robin_drew() -> None:
    rng = np.random.default_rng(4)
    for _ in range(20):
        s = MixtureSampler(2, 8, random_weights(rng, 2), fingerprint="t")
        credits, version = [0, 0], 0
        for step in range(30):
            if step % 7 == 3:
                version += 1
                s.set_weights(rng.dirichlet([1.0, 1.0]), version=version, effective_step=step)
            got = [d for d, _ in s.next_global_batch(step)]
            units = quantize_weights(s.weights).tolist()
            expected = []
            for _ in range(8):
                credits = [c + u for c, u in zip(credits, units)]
                pick = 0 if credits[0] >= credits[1] else 1
                credits[pick] -= _SCALE
                expected.append(pick)
            assert got == expected


def test_credits_stay_bounded_over_many_weight_changes() -> None:
    # Within a version the credits stay near the tree's bound; weight changes (zeros included) do
    # not let them drift: measured below 2.1 draws for K up to 64 over 10,000 steps.
    rng = np.random.default_rng(11)
    for k in (3, 8, 24):
        s = MixtureSampler(k, 16, random_weights(rng, k), fingerprint="t")
        worst = 0
        for step in range(10_000 if k == 8 else 2_000):
            if rng.random() < 0.3:
                w = random_weights(rng, k)
                if rng.random() < 0.3:
                    w[rng.integers(k)] = 0.0
                s.set_weights(w, version=len(s.applied) + 1, effective_step=step)
            s.next_global_arrays(step)
            worst = max(worst, int(np.abs(s.credits).max()))
        assert worst <= 3 * _SCALE
        assert s.credits.sum() == 0  # every draw adds _SCALE in total and takes _SCALE back
