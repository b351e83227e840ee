"""DSIR's passes stream: shards score their documents chunk by chunk and keep a running top-k, and
the driver bisects for the global top-k over the shards' candidate files. The chosen documents (or
word chunks of documents) must be exactly those of one Gumbel top-k over the whole corpus with the
same noise."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mixer.select import select_dsir
from mixer.select.features import NgramHasher
from mixer.select.importance import RunningTopK, gumbel_top_k, log_ratio, take_counts
from mixer.select.shards import candidate_files, fit_shard, iter_docs, make_shards, score_shard
from tests.selection.conftest import DATA, authors_chunks, domains, read_texts

MIN_WORDS = 10


def _one_shot(shard_bytes: int, k: int, seed: int, stream: int, chunk_words: int = 0) -> dict[str, list]:
    """One Gumbel top-k over every eligible raw document (or every chunk of chunk_words words, cut
    by the authors' rule) at once (no shard keeps candidates): the shard's noise drawn in one go
    from the shard's generator, all keys sorted together. Chunks are named [document, chunk]."""

    def units(text: str) -> list[str]:
        return authors_chunks(text, chunk_words) if chunk_words else [text]

    shards = []
    for d in domains():
        shards += make_shards(d, DATA / "raw" / d / "train.jsonl", shard_bytes, len(shards))
    target = make_shards("", DATA / "target.jsonl", 1 << 30, 0)[0]
    h = NgramHasher()

    def counts(shard) -> np.ndarray:
        texts = [u for text, _ in iter_docs(shard) for u in units(text)]
        return sum(np.bincount(h.buckets(u)[0], minlength=10_000) for u in texts)

    ratio = log_ratio(counts(target), sum(counts(s) for s in shards))
    keys, owner = [], []
    offset = dict.fromkeys(domains(), 0)
    for s in shards:
        lw, docs, n = [], [], 0
        for i, (text, _) in enumerate(iter_docs(s)):
            n += 1
            for c, unit in enumerate(units(text)):
                ids, words = h.buckets(unit)
                if words >= MIN_WORDS:
                    lw.append(float(ratio[ids].sum()))
                    doc = offset[s.domain] + i
                    docs.append((s.domain, [doc, c] if chunk_words else doc))
        offset[s.domain] += n
        noise = np.random.default_rng([seed, s.ordinal, stream]).gumbel(size=len(lw))
        keys.append((np.array(lw) if stream == 0 else np.zeros(len(lw))) + noise)
        owner += docs
    top = gumbel_top_k(np.concatenate(keys), k, None)
    out: dict[str, list] = {d: [] for d in domains()}
    for j in top:
        out[owner[j][0]].append(owner[j][1])
    return {d: sorted(v) for d, v in out.items()}


@pytest.mark.parametrize(("shard_bytes", "k", "seed"), [(4096, 30, 0), (5000, 70, 5), (1 << 20, 45, 2)])
def test_streamed_selection_equals_one_gumbel_top_k_over_the_corpus(tmp_path, shard_bytes, k, seed):
    out = tmp_path / "sel"
    report = select_dsir(
        DATA / "target.jsonl",
        [DATA / "raw"],
        out,
        num_samples=k,
        seed=seed,
        shard_bytes=shard_bytes,
        min_words=MIN_WORDS,
        ray_address=None,
        progress=False,
    )
    assert report["shards"] > len(domains()) or shard_bytes > 50_000
    assert json.loads((out / "dsir_selected.json").read_text()) == _one_shot(shard_bytes, k, seed, 0)
    random = _one_shot(shard_bytes, k, seed, 1)
    assert {d: row["random_selected"] for d, row in report["domains"].items()} == {
        d: len(v) for d, v in random.items()
    }
    assert not (out / ".parts").exists()


@pytest.mark.parametrize(
    ("shard_bytes", "k", "seed", "chunk_words"), [(4096, 60, 0, 32), (1 << 20, 90, 3, 9)]
)
def test_chunked_selection_equals_one_gumbel_top_k_over_the_corpus_chunks(
    tmp_path, shard_bytes, k, seed, chunk_words
):
    out = tmp_path / "sel"
    report = select_dsir(
        DATA / "target.jsonl",
        [DATA / "raw"],
        out,
        num_samples=k,
        seed=seed,
        shard_bytes=shard_bytes,
        min_words=MIN_WORDS,
        chunk_words=chunk_words,
        ray_address=None,
        progress=False,
    )
    chosen = json.loads((out / "dsir_selected.json").read_text())
    assert chosen == _one_shot(shard_bytes, k, seed, 0, chunk_words)
    random = _one_shot(shard_bytes, k, seed, 1, chunk_words)
    assert {d: row["random_selected"] for d, row in report["domains"].items()} == {
        d: len(v) for d, v in random.items()
    }
    # Each written line is its chunk, in the order of dsir_selected.json.
    for d, pairs in chosen.items():
        raw = read_texts(DATA / "raw" / d / "train.jsonl")
        if pairs:
            want = [authors_chunks(raw[doc], chunk_words)[c] for doc, c in pairs]
            assert read_texts(out / d / "train.jsonl") == want


def test_scoring_in_chunks_writes_what_one_chunk_writes(tmp_path):
    path = DATA / "raw" / "kjv" / "train.jsonl"
    shard = make_shards("kjv", path, 1 << 30, 3)[0]
    target = make_shards("", DATA / "target.jsonl", 1 << 30, 0)[0]
    ratio = log_ratio(fit_shard(target, 10_000, 0)["counts"], fit_shard(shard, 10_000, 0)["counts"])
    runs = {}
    for chunk in (1, 7, 1 << 20):
        stem = str(tmp_path / f"c{chunk}")
        runs[chunk] = score_shard(shard, ratio, MIN_WORDS, 12, 9, stem, chunk_docs=chunk)
        runs[chunk]["files"] = [
            np.load(f) for name in ("dsir", "random") for f in candidate_files(stem, name)
        ]
    whole = runs[1 << 20]
    assert whole["dsir"] == whole["random"] == 12 and whole["eligible"] > 12
    for chunk in (1, 7):
        assert runs[chunk]["eligible"] == whole["eligible"]
        assert runs[chunk]["log_mass"] == pytest.approx(whole["log_mass"], rel=1e-12)
        for a, b in zip(runs[chunk]["files"], whole["files"]):
            assert np.array_equal(a, b)


def test_running_top_k_and_take_counts_equal_one_stable_sort_with_ties():
    rng = np.random.default_rng(1)
    for _ in range(300):
        # Rounded keys: many ties, which must keep the earlier shard, then the earlier document.
        shards = [
            np.round(rng.normal(size=int(rng.integers(0, 30))), int(rng.integers(0, 2)))
            for _ in range(int(rng.integers(1, 6)))
        ]
        everything = np.concatenate(shards)
        k = int(rng.integers(0, everything.size + 1))
        cands = []
        for s in shards:
            top = RunningTopK(min(k, s.size))
            for part in np.split(np.arange(s.size), np.sort(rng.integers(0, s.size + 1, size=3))):
                top.add(s[part], part)
            keys, idx = top.result()
            assert idx.tolist() == gumbel_top_k(s, min(k, s.size), None).tolist()
            cands.append((keys, idx))
        counts = take_counts([-keys for keys, _ in cands], k)
        offsets = np.cumsum([0] + [s.size for s in shards])
        got = [int(offsets[i] + c[1][j]) for i, c in enumerate(cands) for j in range(counts[i])]
        assert sorted(got) == sorted(gumbel_top_k(everything, k, None).tolist())
    with pytest.raises(ValueError, match="cannot choose 4 of 3"):
        take_counts([np.zeros(3)], 4)
    with pytest.raises(ValueError, match="m must be a non-negative integer"):
        RunningTopK(-1)
