"""MixtureDataset + StepBatchSampler through a torch DataLoader, with and without workers."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, default_collate

from mixer.megatron.data import build_domain_datasets
from mixer.megatron.sampler import MixtureDataset, MixtureSampler, StepBatchSampler, split_sample_id


def make(domain_prefixes, cache_dir: Path) -> tuple[MixtureDataset, MixtureSampler]:
    """A 4-domain mixture over the session corpus and a matching sampler."""
    _, train_prefixes, _ = domain_prefixes
    data = MixtureDataset(
        build_domain_datasets(train_prefixes, 16, seed=0, num_samples=64, cache_dir=cache_dir)
    )
    sampler = MixtureSampler(
        len(train_prefixes), 8, [0.5, 0.25, 0.125, 0.125], fingerprint="t", dataset_lengths=data.lengths()
    )
    return data, sampler


def test_samples_carry_domain_and_sample_id(domain_prefixes, cache_dir: Path) -> None:
    data, sampler = make(domain_prefixes, cache_dir)
    keys = sampler.next_global_batch(0)
    batch = data.batch(keys)
    assert batch["tokens"].shape == batch["labels"].shape == batch["loss_mask"].shape == (8, 16)
    assert batch["position_ids"].shape == (8, 16)
    assert batch["dataset_id"].tolist() == [d for d, _ in keys]
    assert [split_sample_id(i) for i in batch["sample_id"].tolist()] == keys
    assert batch["sample_id"].dtype == torch.int64
    d, i = keys[3]
    assert torch.equal(batch["tokens"][3], data.datasets[d][i]["tokens"])


def test_dataloader_with_workers_matches_and_resumes(domain_prefixes, cache_dir: Path) -> None:
    data, sampler = make(domain_prefixes, cache_dir)
    expected = [sampler.next_global_batch(s) for s in range(6)]

    _, sampler = make(domain_prefixes, cache_dir)
    steps = StepBatchSampler(sampler, num_steps=6)
    loader = DataLoader(
        data, batch_sampler=steps, num_workers=2, prefetch_factor=2, collate_fn=default_collate
    )
    it = iter(loader)
    first = next(it)
    # The loader has already drawn ahead of training: this is the lag of a live version.
    assert sampler.step > 1
    assert first["sample_id"].tolist() == data.batch(expected[0])["sample_id"].tolist()
    # A checkpoint after step 0 must hold the state before step 1, not the sampler's live state.
    state = steps.state_before(1)
    rest = [b["sample_id"].tolist() for b in it]
    assert rest == [data.batch(k)["sample_id"].tolist() for k in expected[1:]]

    _, resumed = make(domain_prefixes, cache_dir)
    resumed.load_state_dict(state)
    again = DataLoader(data, batch_sampler=StepBatchSampler(resumed, num_steps=5), num_workers=0)
    assert [b["sample_id"].tolist() for b in again] == rest
