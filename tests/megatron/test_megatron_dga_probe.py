"""DGA's probe as DoGE measures: per-domain gradients clipped before the products, probe batches
sized by each domain's share of the training batch, the step's learning rate sent along.
Checked against plain autograd and a float64 re-derivation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mixer.megatron.data import build_domain_datasets
from mixer.megatron.model import ModelConfig, build_model, teardown
from mixer.megatron.probes import AlignmentProbe
from mixer.megatron.sampler import MixtureDataset


@pytest.fixture()
def tiny(domain_prefixes, cache_dir: Path):
    _, train_prefixes, _ = domain_prefixes
    model = build_model(ModelConfig(seq_length=16, hidden_size=32), seed=3)
    datasets = build_domain_datasets(train_prefixes, 16, seed=0, num_samples=None, cache_dir=cache_dir)
    yield model, datasets
    teardown()


def _gradient(model, batch) -> np.ndarray:
    model.zero_grad()
    per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    mask = batch["loss_mask"].float()
    ((per_token * mask).sum() / mask.sum()).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double().numpy()


def test_clipped_share_sized_alignment_matches_autograd(tiny) -> None:
    model, datasets = tiny
    K = len(datasets)
    weights = np.linspace(1.0, 3.0, K)
    weights /= weights.sum()
    batch, least, target = 12, 2, [0, K - 1]
    unclipped = [
        np.linalg.norm(_gradient(model, MixtureDataset(datasets).batch([(d, 0), (d, 1)]))) for d in range(K)
    ]
    max_norm = float(np.median(unclipped))  # clips some domains, not all
    probe = AlignmentProbe(
        model, datasets, every=1, samples=least, batch=batch, max_grad_norm=max_norm, target=target
    )
    sizes = probe.sizes(weights)
    assert sizes == [max(least, round(w * batch)) for w in weights]
    assert len(set(sizes)) > 1, "the shares do not tell the domains apart"
    got = probe.measure(step=0, weights=weights, lr=2.5e-4)

    data = MixtureDataset(datasets)
    rows = []
    for d in range(K):
        g = _gradient(model, data.batch([(d, j % len(datasets[d])) for j in range(sizes[d])]))
        rows.append(g * min(1.0, max_norm / (np.linalg.norm(g) + 1e-6)))
    G = np.stack(rows)
    norms = np.linalg.norm(G, axis=1)
    assert (norms <= max_norm * (1 + 1e-5)).all() and (np.asarray(unclipped) > max_norm).any()
    W = G @ G[target].sum(axis=0)
    W[target] -= (G[target] ** 2).sum(axis=1)
    np.testing.assert_allclose(got["alignment"].numpy(), W, rtol=1e-4, atol=1e-7)
    assert got["grad_norm_mean"].item() == pytest.approx(norms.mean(), rel=1e-5)
    assert got["lr"].item() == 2.5e-4


def test_without_batch_or_weights_every_domain_gets_the_least(tiny) -> None:
    model, datasets = tiny
    K = len(datasets)
    assert AlignmentProbe(model, datasets, every=1, samples=3).sizes(np.ones(K)) == [3] * K
    assert AlignmentProbe(model, datasets, every=1, samples=3, batch=8).sizes(None) == [3] * K
    with pytest.raises(ValueError, match="weights must be"):
        AlignmentProbe(model, datasets, every=1, samples=3, batch=8).sizes([float("nan")] * K)
    with pytest.raises(ValueError, match="max_grad_norm >= 0"):
        AlignmentProbe(model, datasets, every=1, samples=3, max_grad_norm=-1.0)
