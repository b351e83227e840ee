"""The plug-in's data iterator in one process: announced steps with DataLoader workers, resume, micro-batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mixer.megatron.announce import AnnouncedVersions
from mixer.megatron.data import build_domain_datasets
from mixer.megatron.lm import LossReporter, MixtureLoader, Topology
from mixer.megatron.sampler import MixtureSampler, split_sample_id
from mixer.megatron.versions import VersionUpdate


class Scripted:
    """Versions handed out at given announcement steps (what a session would deliver then)."""

    def __init__(self, at: dict[int, VersionUpdate]) -> None:
        self.at = dict(at)
        self.polled: list[int] = []

    def poll_version(self, step: int) -> VersionUpdate | None:
        self.polled.append(step)
        return self.at.pop(step, None)


def make_loader(datasets, at: dict[int, VersionUpdate], *, gbs=8, mbs=2, workers=2, interval=1):
    k = len(datasets)
    sampler = MixtureSampler(k, gbs, [1.0] * k, fingerprint="t", dataset_lengths=[len(d) for d in datasets])
    channel = AnnouncedVersions(Scripted(at), k, interval=interval)
    return MixtureLoader(datasets, sampler, micro_batch_size=mbs, channel=channel, num_workers=workers)


def run(loader: MixtureLoader, steps: int) -> list[list[int]]:
    """Sample ids of each step (all micro-batches)."""
    out = []
    for _ in range(steps):
        ids: list[int] = []
        for _ in range(loader.num_microbatches):
            next(loader)
            ids += loader.last_meta.sample_id.tolist()
        out.append(ids)
    return out


def odm_versions(k: int, steps: int) -> dict[int, VersionUpdate]:
    """The versions ODM derives (the service's own pure engine) from per-step losses, by the step
    before which a session would deliver each: a new one every few steps, some for steps already drawn."""
    from mixer.engine import Engine
    from mixer.signals import Report
    from mixer.spec import JobSpec

    spec = JobSpec.from_dict(
        {
            "name": "resume",
            "domains": [{"name": f"d{i}"} for i in range(k)],
            "strategy": {"name": "odm"},
            "cadence": {"update_every": 3, "min_weight": 0.02, "delay": 1},
        }
    )
    engine, rng, at = Engine(spec), np.random.default_rng(5), {}
    for step in range(steps):
        loss = 1.0 + 0.2 * np.arange(k) + 0.05 * rng.random(k)
        report = Report(
            step=step,
            source="w",
            domain_loss_sum=16 * loss,
            domain_token_count=np.full(k, 16.0),
            domain_sample_count=np.ones(k, dtype=np.int64),
        )
        version = engine.ingest(report, step)
        if version is not None:
            at[step + 1] = VersionUpdate.of(version)
    return at


@pytest.fixture()
def datasets(domain_prefixes, cache_dir: Path):
    _, train, _ = domain_prefixes
    return build_domain_datasets(train, seq_length=16, seed=0, num_samples=None, cache_dir=cache_dir)


@pytest.mark.slow
def test_a_version_is_in_force_from_its_announced_step_with_workers(datasets) -> None:
    k = len(datasets)
    one_hot = tuple(1.0 if i == k - 1 else 0.0 for i in range(k))
    runs = []
    for _ in range(2):
        loader = make_loader(datasets, {2: VersionUpdate(1, 9, one_hot), 12: VersionUpdate(2, 0, (1.0,) * k)})
        assert loader.horizon == 2  # 2 workers x prefetch 2 over 4 micro-batches a step, plus one
        ids = run(loader, 20)
        runs.append((ids, loader.sampler.applied))
        domains = [{split_sample_id(s)[0] for s in step} for step in ids]
        # Announced at step 2 for step 9: exactly from step 9, although workers prefetch ahead.
        assert all(d != {k - 1} for d in domains[:9]) and all(d == {k - 1} for d in domains[9:14])
        # Announced at step 12 for step 0 (late): at step 12 + the horizon, the same in every run.
        assert loader.sampler.applied == [(0, 0), (1, 9), (2, 14)]
        assert len(domains[14]) > 1
    assert runs[0] == runs[1]


@pytest.mark.slow
def test_resume_reproduces_the_sample_ids_with_versions_in_flight(datasets) -> None:
    at = odm_versions(len(datasets), 30)
    assert len(at) >= 5
    uninterrupted = make_loader(datasets, at)
    whole = run(uninterrupted, 30)
    assert len(uninterrupted.sampler.applied) >= 5  # the weights really moved during the run
    first = make_loader(datasets, at)
    head = run(first, 13)
    state = first.save_state()
    assert state["step"] == 13
    second = make_loader(datasets, {t: v for t, v in at.items() if t >= 13})
    second.load_state(state)
    assert head + run(second, 17) == whole
    with pytest.raises(RuntimeError, match="middle of step"):
        next(second)
        second.save_state()


def test_micro_batches_accumulate_to_the_same_statistics_as_one_batch() -> None:
    g = torch.Generator().manual_seed(0)
    per_token = torch.rand(4, 6, generator=g)
    mask = (torch.rand(4, 6, generator=g) > 0.3).float()
    domain = torch.tensor([0, 2, 2, 1])
    ids = torch.arange(4) + 100
    from mixer.megatron.lm import MicroBatchMeta

    def reported(mbs: int) -> dict:
        rep = LossReporter(3, Topology())
        rep.keep_records = True
        n = 4 // mbs
        for i in range(n):
            sl = slice(i * mbs, (i + 1) * mbs)
            meta = MicroBatchMeta(
                dataset_id=domain[sl], sample_id=ids[sl], step=0, index=i, num_microbatches=n, version=0
            )
            rep(lambda out, m=mask[sl]: (out * m).sum(), mask[sl], meta)(per_token[sl])
        rep.flush()
        return rep.recorded[0]

    one, four = reported(4), reported(1)
    assert one["sample_id"] == four["sample_id"] == ids.tolist()
    for key in ("sample_loss", "domain_loss_sum", "domain_token_count"):
        np.testing.assert_allclose(four[key], one[key], rtol=1e-6)
    expected = np.zeros(3)
    np.add.at(expected, domain.numpy(), (per_token * mask).sum(1).numpy())
    np.testing.assert_allclose(one["domain_loss_sum"], expected, rtol=1e-6)
