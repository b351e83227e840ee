"""Hashed n-gram features and importance weights against a float64 re-derivation, on stored inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mixer.select.features import NUM_BUCKETS, NgramHasher, tokenize
from mixer.select.importance import (
    domain_prior,
    gumbel_top_k,
    kl_reduction,
    log_importance_weights,
    log_ratio,
    logsumexp,
)
from tests.selection.conftest import DATA, bag, bucket, domains, kl, log_weight, ngrams, read_texts
from tests.selection.conftest import log_ratio as ref_log_ratio


def _raw_texts() -> list[str]:
    return [t for d in domains() for t in read_texts(DATA / "raw" / d / "train.jsonl")]


def test_buckets_match_the_rederivation_and_the_memo_changes_nothing():
    texts = _raw_texts() + read_texts(DATA / "target.jsonl")
    memo, no_memo, tiny_memo = NgramHasher(), NgramHasher(max_cache=0), NgramHasher(max_cache=7)
    for text in texts:
        expected = [bucket(g, NUM_BUCKETS) for g in ngrams(text)]
        for h in (memo, no_memo, tiny_memo):
            ids, words = h.buckets(text)
            assert ids.tolist() == expected
            assert words == len(tokenize(text)) and len(expected) == (2 * words - 1 if words else 0)
        assert memo.counts(text).sum() == len(expected)


def test_log_importance_weights_match_the_float64_rederivation():
    target, raw = read_texts(DATA / "target.jsonl"), _raw_texts()
    ref = ref_log_ratio(bag(target, NUM_BUCKETS), bag(raw, NUM_BUCKETS), NUM_BUCKETS)
    h = NgramHasher()
    tc = sum(h.counts(t) for t in target)
    rc = sum(h.counts(t) for t in raw)
    ratio = log_ratio(tc, rc)
    np.testing.assert_allclose(ratio, ref, rtol=1e-13, atol=1e-12)
    ours = log_importance_weights([h.buckets(t)[0] for t in raw], ratio)
    expected = [log_weight(t, ref) for t in raw]
    np.testing.assert_allclose(ours, expected, rtol=1e-11, atol=1e-8)
    # The target's own documents look more like the target than the average raw document does.
    assert np.mean(log_importance_weights([h.buckets(t)[0] for t in target], ratio)) > np.mean(ours)


def test_kl_reduction_and_prior_match_the_rederivation():
    target, raw = read_texts(DATA / "target.jsonl"), _raw_texts()
    chosen = raw[::3]
    h = NgramHasher()
    counts = [sum(h.counts(t) for t in texts) for texts in (target, raw, chosen)]
    got = kl_reduction(*counts)
    bt, br, bs = bag(target, NUM_BUCKETS), bag(raw, NUM_BUCKETS), bag(chosen, NUM_BUCKETS)
    assert got["kl_target_raw"] == pytest.approx(kl(bt, br), rel=1e-12)
    assert got["kl_target_selected"] == pytest.approx(kl(bt, bs), rel=1e-12)
    assert got["kl_reduction"] == pytest.approx(kl(bt, br) - kl(bt, bs), rel=1e-9, abs=1e-12)
    lw = np.array([-3.0, 1.0, 0.5, 2.0])
    prior = domain_prior({"a": logsumexp(lw[:2]), "b": logsumexp(lw[2:])})
    mass = [math.exp(-3) + math.exp(1), math.exp(0.5) + math.exp(2)]
    assert prior["a"] == pytest.approx(mass[0] / sum(mass), rel=1e-12)
    assert sum(prior.values()) == pytest.approx(1.0, rel=1e-15)


def test_gumbel_top_k_per_shard_then_merged_equals_the_global_top_k():
    rng = np.random.default_rng(3)
    log_w, noise = rng.normal(size=1000) * 5, rng.gumbel(size=1000)
    whole = gumbel_top_k(log_w, 50, noise)
    keys = log_w + noise
    assert sorted(whole.tolist()) == sorted(np.argsort(-keys)[:50].tolist())
    cuts = np.sort(rng.choice(np.arange(1, 1000), size=6, replace=False))
    cand = []
    for part in np.split(np.arange(1000), cuts):
        cand += part[gumbel_top_k(log_w[part], min(50, part.size), noise[part])].tolist()
    merged = np.array(cand)[np.argsort(-keys[cand], kind="stable")[:50]]
    assert sorted(merged.tolist()) == sorted(whole.tolist())
    assert gumbel_top_k(log_w, 5, None).tolist() == np.argsort(-log_w)[:5].tolist()


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="num_buckets"):
        NgramHasher(0)
    with pytest.raises(ValueError, match="target: no n-grams"):
        log_ratio(np.zeros(10), np.ones(10))
    with pytest.raises(ValueError, match="cannot choose 5 of 3"):
        gumbel_top_k(np.zeros(3), 5, None)
