"""Our DSIR against the authors' package (`data-selection` 1.0.3, installed by the dev extra) on the
stored tiny inputs: the same log importance weights, and the same chosen documents given the same
Gumbel noise."""

from __future__ import annotations

import json

import numpy as np
import pytest
from data_selection import HashedNgramDSIR

from mixer.select.features import NgramHasher
from mixer.select.importance import gumbel_top_k, log_importance_weights, log_ratio
from mixer.select.shards import fit_shard, iter_docs, make_shards
from tests.selection.conftest import DATA, domains

MIN_WORDS = 30


@pytest.fixture(scope="module")
def package_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dsir_pkg")
    paths = [str(DATA / "raw" / d / "train.jsonl") for d in domains()]
    dsir = HashedNgramDSIR(
        raw_datasets=paths,
        target_datasets=[str(DATA / "target.jsonl")],
        cache_dir=str(tmp / "cache"),
        num_proc=1,
        min_example_length=MIN_WORDS,
    )
    dsir.fit_importance_estimator(num_tokens_to_fit="all")
    dsir.compute_importance_weights()
    weights = [np.load(tmp / "cache" / "log_importance_weights" / f"{i}.npy") for i in range(len(paths))]
    return dsir, weights, tmp


def _ours():
    shards = [
        make_shards(d, DATA / "raw" / d / "train.jsonl", 1 << 30, i)[0] for i, d in enumerate(domains())
    ]
    target = make_shards("", DATA / "target.jsonl", 1 << 30, 0)[0]
    raw_counts = sum(fit_shard(s, 10_000, MIN_WORDS)["counts"] for s in shards)
    ratio = log_ratio(fit_shard(target, 10_000, MIN_WORDS)["counts"], raw_counts)
    h = NgramHasher()
    out = []
    for s in shards:
        texts = [t for t, _ in iter_docs(s)]
        ids = [h.buckets(t) for t in texts]
        out.append((texts, log_importance_weights([b for b, _ in ids], ratio), np.array([w for _, w in ids])))
    return out


def test_log_importance_weights_equal_the_packages(package_run):
    _, theirs, _ = package_run
    ours = _ours()
    assert len(ours) == len(theirs)
    for (_, lw, _), ref in zip(ours, theirs):
        assert lw.shape == ref.shape
        np.testing.assert_allclose(lw, ref, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("seed", [0, 11])
def test_chosen_documents_equal_the_packages_given_its_gumbel_noise(package_run, tmp_path, seed):
    dsir, _, _ = package_run
    ours = _ours()
    texts = [t for tx, _, _ in ours for t in tx]
    lw = np.concatenate([w for _, w, _ in ours])
    eligible = np.flatnonzero(np.concatenate([n for _, _, n in ours]) >= MIN_WORDS)
    k = len(eligible) // 3
    # The package draws its noise from numpy's global generator, over the eligible documents in order.
    noise = np.random.RandomState(seed).gumbel(size=eligible.size)
    chosen = {texts[i] for i in eligible[gumbel_top_k(lw[eligible], k, noise)]}
    np.random.seed(seed)
    dsir.resample(out_dir=str(tmp_path / "out"), num_to_sample=k, cache_dir=str(tmp_path / "cache"))
    picked = [
        json.loads(line)["text"] for f in sorted((tmp_path / "out").glob("*.jsonl")) for line in f.open()
    ]
    assert len(picked) == k and set(picked) == chosen
