"""Our DSIR against the authors' package (`data-selection` 1.0.3, installed by the dev extra) on the
stored tiny inputs: the same log importance weights, and the same chosen documents given the same
Gumbel noise. With chunks: the package does not cut documents (the authors cut the Pile into
128-word chunks before running it), so it runs on the inputs cut by the authors' rule, and we on
the uncut inputs with chunk_words."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from data_selection import HashedNgramDSIR

from mixer.select.features import NgramHasher, split_chunks
from mixer.select.importance import gumbel_top_k, log_ratio
from mixer.select.shards import fit_shard, iter_docs, make_shards, unit_log_weights
from tests.selection.conftest import DATA, authors_chunks, domains

MIN_WORDS = 30
CHUNK_WORDS = (0, 40)


def _cut(src: Path, dst: Path, n: int) -> str:
    """The JSONL file src with every document replaced by its n-word chunks (the authors' cut)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with dst.open("w") as fh:
        for line in src.read_text(encoding="utf-8").splitlines():
            if line.strip():
                for chunk in authors_chunks(json.loads(line)["text"], n):
                    fh.write(json.dumps({"text": chunk}) + "\n")
    return str(dst)


@pytest.fixture(scope="module", params=CHUNK_WORDS)
def package_run(tmp_path_factory, request):
    n = request.param
    tmp = tmp_path_factory.mktemp("dsir_pkg")
    paths = [str(DATA / "raw" / d / "train.jsonl") for d in domains()]
    target = str(DATA / "target.jsonl")
    if n:
        paths = [_cut(Path(p), tmp / "cut" / d / "train.jsonl", n) for p, d in zip(paths, domains())]
        target = _cut(Path(target), tmp / "cut" / "target.jsonl", n)
    dsir = HashedNgramDSIR(
        raw_datasets=paths,
        target_datasets=[target],
        cache_dir=str(tmp / "cache"),
        num_proc=1,
        min_example_length=MIN_WORDS,
    )
    dsir.fit_importance_estimator(num_tokens_to_fit="all")
    dsir.compute_importance_weights()
    weights = [np.load(tmp / "cache" / "log_importance_weights" / f"{i}.npy") for i in range(len(paths))]
    return dsir, weights, n


def _ours(n: int):
    """(unit texts, log w, words) per raw domain, from the uncut inputs."""
    shards = [
        make_shards(d, DATA / "raw" / d / "train.jsonl", 1 << 30, i)[0] for i, d in enumerate(domains())
    ]
    target = make_shards("", DATA / "target.jsonl", 1 << 30, 0)[0]
    raw_counts = sum(fit_shard(s, 10_000, MIN_WORDS, n)["counts"] for s in shards)
    ratio = log_ratio(fit_shard(target, 10_000, MIN_WORDS, n)["counts"], raw_counts)
    h = NgramHasher()
    out = []
    for s in shards:
        texts = [u for t, _ in iter_docs(s) for u in split_chunks(t, n)]
        ((lw, idx),) = unit_log_weights(s, ratio, 0, n, chunk_docs=1 << 20)
        assert idx.tolist() == list(range(len(texts)))
        out.append((texts, lw, np.array([h.buckets(t)[1] for t in texts])))
    return out


def test_log_importance_weights_equal_the_packages(package_run):
    _, theirs, n = package_run
    ours = _ours(n)
    assert len(ours) == len(theirs)
    for (_, lw, _), ref in zip(ours, theirs):
        assert lw.shape == ref.shape
        np.testing.assert_allclose(lw, ref, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("seed", [0, 11])
def test_chosen_documents_equal_the_packages_given_its_gumbel_noise(package_run, tmp_path, seed):
    dsir, _, n = package_run
    ours = _ours(n)
    texts = [t for tx, _, _ in ours for t in tx]
    lw = np.concatenate([w for _, w, _ in ours])
    eligible = np.flatnonzero(np.concatenate([words for _, _, words in ours]) >= MIN_WORDS)
    k = len(eligible) // 3
    # The package draws its noise from numpy's global generator, over the eligible units in order.
    noise = np.random.RandomState(seed).gumbel(size=eligible.size)
    chosen = {texts[i] for i in eligible[gumbel_top_k(lw[eligible], k, noise)]}
    np.random.seed(seed)
    dsir.resample(out_dir=str(tmp_path / "out"), num_to_sample=k, cache_dir=str(tmp_path / "cache"))
    picked = [
        json.loads(line)["text"] for f in sorted((tmp_path / "out").glob("*.jsonl")) for line in f.open()
    ]
    assert len(picked) == k and set(picked) == chosen
