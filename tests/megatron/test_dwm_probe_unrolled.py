"""DWM's probe measured after the optimizer step: s_i = <grad l_i(theta), grad L_val(theta')>, the
per-sample scalars of the one-step-unrolled upper-level gradient, on the output layer's weight,
against plain autograd on a real megatron-core GPTModel."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mixer.megatron.data import build_domain_datasets
from mixer.megatron.model import ModelConfig, build_model, teardown
from mixer.megatron.probes import SampleAlignProbe
from mixer.megatron.sampler import MixtureDataset


@pytest.fixture()
def tiny(domain_prefixes, cache_dir: Path):
    _, train_prefixes, val_prefixes = domain_prefixes
    model = build_model(ModelConfig(seq_length=16, hidden_size=32), seed=4)
    datasets = build_domain_datasets(train_prefixes, 16, seed=0, num_samples=None, cache_dir=cache_dir)
    vals = build_domain_datasets(val_prefixes, 16, seed=0, num_samples=None, cache_dir=cache_dir)
    yield model, datasets, vals
    teardown()


def token_mean_loss(model, batch) -> torch.Tensor:
    per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    mask = batch["loss_mask"].float()
    return (per_token * mask).sum() / mask.sum()


def test_alignment_after_the_step_pairs_theta_with_theta_prime(tiny) -> None:
    model, datasets, vals = tiny
    probe = SampleAlignProbe(model, vals, every=1, samples=3)
    W = model.output_layer.weight
    keys = [(0, 2), (1, 0), (2, 3)]
    batch = MixtureDataset(datasets).batch(keys)
    per_sample = []
    for key in keys:  # grad_W l_i at theta, before the step
        (g,) = torch.autograd.grad(token_mean_loss(model, MixtureDataset(datasets).batch([key])), [W])
        per_sample.append(g)
    with probe.capture(True):
        loss = token_mean_loss(model, batch)
    optimizer = torch.optim.SGD(model.parameters(), lr=5.0)  # a large step: theta' far from theta
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    got = probe.measure(batch)

    val = MixtureDataset(vals)
    L_val = sum(
        token_mean_loss(model, val.batch([(d, i) for i in range(3)])) for d in range(len(vals))
    ) / len(vals)
    (G_next,) = torch.autograd.grad(L_val, [W])  # at theta'
    for i, g in enumerate(per_sample):
        assert got[i].item() == pytest.approx((g * G_next).sum().item(), rel=1e-3, abs=1e-7)
    # Pairing both gradients at theta' instead would give other numbers: the check can fail.
    (g_next,) = torch.autograd.grad(token_mean_loss(model, MixtureDataset(datasets).batch([keys[0]])), [W])
    assert abs((g_next * G_next).sum().item() - got[0].item()) > 1e-3 * abs(got[0].item()) + 1e-6
    probe.close()
