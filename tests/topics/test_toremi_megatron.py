"""ToReMi in the Megatron plain loop (CPU, gloo) on a tiny corpus, end to end: `mixer topics build`
labels the documents; the loop reads each sample's topics from the built dataset; the reports the
service stores carry them (several per sample where a sample spans documents of several topics);
the versions' topic weights come back and weight the loss of exactly those samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from mixer.megatron.corpus import write_synthetic_corpus
from mixer.megatron.data import build_domain_datasets, prepare_corpus
from mixer.megatron.loader import with_topics
from mixer.megatron.pretrain import PretrainConfig, run_pretrain
from mixer.megatron.sampler import split_sample_id
from mixer.replay import get_job, job_log
from mixer.store import Store
from mixer.topics import TopicsConfig, build_topics
from mixer.weighting.topic import sample_weights_np

SEQ, BATCH, STEPS, EVERY = 32, 8, 12, 2


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> tuple[dict[str, dict[str, str]], int]:
    root = tmp_path_factory.mktemp("toremi")
    write_synthetic_corpus(root / "corpus", seed=3, docs_per_domain=60)
    prepared = prepare_corpus(root / "corpus", root / "data", progress=False)
    summary = build_topics(root / "corpus", root / "data", TopicsConfig(k=4, method="tfidf", seed=0))
    return prepared, summary["k"]


def test_samples_carry_the_topics_of_the_documents_they_span(labelled, tmp_path: Path) -> None:
    prepared, k = labelled
    prefixes = [p["train"] for p in prepared.values()]
    datasets = with_topics(build_domain_datasets(prefixes, SEQ, 1, None, tmp_path / "cache"), prefixes)
    spans_several = 0
    for prefix, ds in zip(prefixes, datasets, strict=True):
        labels = np.load(prefix + ".topics.npy")
        for index in range(min(len(ds), 40)):
            row = ds[index]["topic_ids"].numpy()
            docs = ds.topics.documents(index)
            want = list(dict.fromkeys(labels[docs].tolist()))
            assert row.shape == (k,) and row[: len(want)].tolist() == want and (row[len(want) :] == -1).all()
            spans_several += len(want) > 1
    assert spans_several, "no sample spans documents of two topics; the corpus is too easy for this test"


def test_plain_loop_trains_on_real_topics_through_the_service(
    labelled, server, sqlite_url, tmp_path: Path
) -> None:
    prepared, k = labelled
    prefixes = {d: p["train"] for d, p in prepared.items()}
    spec_path = tmp_path / "toremi.yaml"
    spec_path.write_text(
        yaml.safe_dump(
            {
                "name": "toremi-topics",
                "domains": [{"name": d, "prefix": p} for d, p in prefixes.items()],
                "strategy": {"name": "toremi", "params": {"total_steps": STEPS, "num_topics": k}},
                "weighting": {"name": "topic"},
                "cadence": {"update_every": EVERY, "delay": 1},
            },
            sort_keys=False,
        )
    )
    record = run_pretrain(
        PretrainConfig.of(
            spec=spec_path,
            mixer=server.address,
            steps=STEPS,
            seq_length=SEQ,
            global_batch_size=BATCH,
            lr=3e-3,
            eval_samples=4,
            progress=False,
            strict=True,
        )
    )
    assert record["all_reports_acknowledged"] and record["final_step"] == STEPS

    # Each sample's topics as the built dataset gives them (not its domain id).
    spec, _, log = job_log(Store(sqlite_url), "toremi-topics")
    datasets = with_topics(
        build_domain_datasets(list(prefixes.values()), SEQ, spec.seed, None, tmp_path / "cache"),
        list(prefixes.values()),
    )

    def topics_of(sample_id: int) -> list[int]:
        domain, index = split_sample_id(sample_id)
        row = datasets[domain].topics.row(index)
        return row[row >= 0].tolist()

    reports = [r for _, r in log]
    train = [r for r in reports if r.sample_loss is not None]
    evals = [r for r in reports if r.val_loss is not None]
    assert len(train) == STEPS and evals, "a report per step, and the evaluations the stage switch needs"
    differs = 0
    for r in train:
        rows = r.sample_topic if r.sample_topic.ndim == 2 else r.sample_topic[:, None]
        for sid, domain, row in zip(r.sample_id.tolist(), r.sample_domain.tolist(), rows, strict=True):
            got = row[row >= 0].tolist()
            assert got == topics_of(sid)
            differs += got != [domain]
    assert differs, "every reported topic equals the domain id: the topics did not come from the build"

    # The loss weights of each step: the applied version's topic weights over the samples' topics.
    store = Store(sqlite_url)
    versions = {v.version: v for v, _ in store.versions(get_job(store, "toremi-topics").id)}
    assert any(len(v.params.get("topic_weights", [])) == k for v in versions.values())
    moved = 0
    for step, (ids, version, w) in enumerate(
        zip(record["sample_ids"], record["versions"], record["instance_weights"], strict=True)
    ):
        tw = versions[version].params.get("topic_weights")
        if not tw:
            assert np.allclose(w, 1.0), f"step {step}: no topic weights yet, uniform loss weights"
            continue
        rows = np.full((len(ids), k), -1)
        for i, sid in enumerate(ids):
            t = topics_of(sid)
            rows[i, : len(t)] = t
        np.testing.assert_allclose(w, sample_weights_np(rows, tw), rtol=1e-5, err_msg=f"step {step}")
        moved += np.ptp(w) > 1e-6
    assert moved, "the topic weights never changed the loss weights"
    # The preference acts on the loss; the sampling weights stay the prior.
    for v in versions.values():
        np.testing.assert_allclose(v.weights, np.asarray(spec.prior()), rtol=1e-12)
