"""Probes: their arithmetic against plain autograd, and their signals through a real service."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import run_pretrain_cli

from mixer.client import MixerClient
from mixer.megatron.data import build_domain_datasets
from mixer.megatron.model import ModelConfig, build_model, teardown
from mixer.megatron.probes import AlignmentProbe, SampleAlignProbe
from mixer.megatron.sampler import MixtureDataset, split_sample_id
from mixer.replay import job_log
from mixer.store import Store


@pytest.fixture()
def tiny(domain_prefixes, cache_dir: Path):
    """A tiny model and the train / val datasets of the session corpus."""
    _, train_prefixes, val_prefixes = domain_prefixes
    model = build_model(ModelConfig(seq_length=16, hidden_size=32), seed=2)
    datasets = build_domain_datasets(train_prefixes, 16, seed=0, num_samples=None, cache_dir=cache_dir)
    vals = build_domain_datasets(val_prefixes, 16, seed=0, num_samples=None, cache_dir=cache_dir)
    yield model, datasets, vals
    teardown()


def loss_of(model, batch) -> torch.Tensor:
    per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    mask = batch["loss_mask"].float()
    return (per_token * mask).sum() / mask.sum()


@pytest.mark.parametrize("exclude_self", [False, True])
def test_alignment_matches_autograd(tiny, exclude_self: bool) -> None:
    model, datasets, _ = tiny
    probe = AlignmentProbe(model, datasets, every=1, samples=2, target=[0, 2], exclude_self=exclude_self)
    got = probe.measure(step=0)
    data = MixtureDataset(datasets)
    rows = []
    for d in range(len(datasets)):
        model.zero_grad()
        loss_of(model, data.batch([(d, 0), (d, 1)])).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double())
    G = torch.stack(rows)
    expected = G @ (G[0] + G[2])
    if exclude_self:
        expected[[0, 2]] -= (G[[0, 2]] ** 2).sum(dim=1)
    torch.testing.assert_close(got["alignment"], expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got["grad_norm_mean"], G.norm(dim=1).mean(), rtol=1e-5, atol=1e-7)


def test_sample_alignment_matches_autograd(tiny) -> None:
    model, datasets, vals = tiny
    probe = SampleAlignProbe(model, vals, every=1, samples=3)
    W = model.output_layer.weight
    keys = [(0, 0), (1, 4), (2, 1)]
    batch = MixtureDataset(datasets).batch(keys)
    with probe.capture(True):
        model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    got = probe.measure(batch)
    # The balanced validation loss: the mean over domains of each domain's token-mean loss.
    val = MixtureDataset(vals)
    L_val = sum(loss_of(model, val.batch([(d, i) for i in range(3)])) for d in range(len(vals))) / len(vals)
    (G,) = torch.autograd.grad(L_val, [W])
    for i, key in enumerate(keys):
        (g,) = torch.autograd.grad(loss_of(model, MixtureDataset(datasets).batch([key])), [W])
        assert got[i].item() == pytest.approx((g * G).sum().item(), rel=1e-3, abs=1e-7)
    probe.close()


def reports(db: str, job: str):
    store = Store(db, migrate=False)
    try:
        return [r for _, r in job_log(store, job)[2]]
    finally:
        store.close()


@pytest.mark.slow
def test_doremi_gets_excess_loss_from_a_reference(write_spec, server, tmp_path: Path) -> None:
    ref = tmp_path / "reference"
    run_pretrain_cli(write_spec("reference-run"), "--save", str(ref), steps=10)
    spec = write_spec("doremi", "doremi")
    record = run_pretrain_cli(spec, "--mixer", server.address, "--reference", str(ref), steps=15)
    assert record["probes"]["needs"] == ["domain_loss", "excess_loss"]
    got = [r for r in reports(server.db, "doremi") if r.excess_loss_sum is not None]
    assert len(got) == 15 and all((r.excess_loss_sum >= 0).all() for r in got)
    assert sum(r.excess_loss_sum.sum() for r in got) > 0
    with MixerClient(server.address) as client:
        versions = client.list_versions("doremi")
    assert len(versions) > 1
    # Mode paper (the default): workers keep sampling from the prior, and each version's alpha / q
    # weights the loss of every sample by its domain, as applied at that step.
    assert all(np.array_equal(v.weights, versions[0].weights) for v in versions)
    loss_weights = {v.version: v.params["domain_loss_weights"] for v in versions[1:]}
    assert max(loss_weights[versions[-1].version]) != min(loss_weights[versions[-1].version])
    checked = 0
    for version, ids, w in zip(record["versions"], record["sample_ids"], record["instance_weights"], strict=True):
        if version in loss_weights:
            c = [loss_weights[version][split_sample_id(i)[0]] for i in ids]
            np.testing.assert_allclose(w, c, rtol=1e-6)
            checked += 1
    assert checked > 0, "no step ran under a version that carries loss weights"


def test_doremi_without_a_reference_is_refused(write_spec) -> None:
    import click

    # Refused before anything starts: no service needed at that address.
    with pytest.raises(click.ClickException, match="--reference"):
        run_pretrain_cli(write_spec("doremi-noref", "doremi"), "--mixer", "127.0.0.1:1", steps=2)


@pytest.mark.slow
def test_dga_gets_alignment_reports(write_spec, server) -> None:
    spec = write_spec("dga", {"name": "dga", "params": {"target": ["arith", "prose"]}})
    record = run_pretrain_cli(spec, "--mixer", server.address, steps=15)
    assert record["probes"]["align_every"] == 5 and record["probes"]["align_target"] == [
        0,
        3,
    ]  # domains sorted: arith, dupes, noise, prose
    got = [r for r in reports(server.db, "dga") if r.alignment is not None]
    assert [r.step for r in got] == [4, 9, 14]
    assert all(r.extra["grad_norm_mean"] > 0 for r in got)
    # The probed step's learning rate goes along: DGA's step size is lr_t / mu (DoGE's scaling).
    lr = [r.extra["lr"] for r in got]
    assert all(x > 0 for x in lr) and len(set(lr)) == len(lr), lr
    with MixerClient(server.address) as client:
        assert len(client.list_versions("dga")) == 1 + len(got)  # one DGA update per alignment report


@pytest.mark.slow
def test_val_loss_reports_drive_aioli(write_spec, server) -> None:
    record = run_pretrain_cli(write_spec("aioli", "aioli"), "--mixer", server.address, steps=20)
    assert record["probes"]["eval_every"] == 5
    got = [r for r in reports(server.db, "aioli") if r.val_loss is not None]
    assert [r.step for r in got] == [5, 10, 15, 20] and all(np.isfinite(r.val_loss).all() for r in got)
    with MixerClient(server.address) as client:
        assert len(client.list_versions("aioli")) > 1


@pytest.mark.slow
def test_dwm_weighting_gets_sample_alignment(write_spec, server) -> None:
    spec = write_spec("dwm", "odm", weighting={"name": "dwm", "params": {"seq_len": 32}})
    run_pretrain_cli(spec, "--mixer", server.address, steps=10)
    got = [r for r in reports(server.db, "dwm") if r.sample_align is not None]
    assert [r.step for r in got] == [4, 9]
    assert all(r.sample_align.shape == r.sample_loss.shape == (8,) for r in got)
