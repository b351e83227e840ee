"""Instance weighting in the step follows the applied version's parameters (params and DWM blob)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mixer.megatron.data import build_domain_datasets
from mixer.megatron.instance import InstanceWeighting
from mixer.megatron.sampler import MixtureSampler
from mixer.megatron.train import TrainConfig, train
from mixer.megatron.versions import VersionUpdate
from mixer.spec import JobSpec
from mixer.weighting import dwm


class VersionScript:
    """Hands out prepared versions by step through poll_version, records nothing."""

    def __init__(self, updates: dict[int, VersionUpdate]) -> None:
        self.updates = updates

    def poll(self):  # the older protocol; poll_version is preferred when present
        raise AssertionError("poll_version should be used")

    def poll_version(self, step: int) -> VersionUpdate | None:
        return self.updates.get(step)

    def report(self, **kwargs) -> None:
        pass


def run(domain_prefixes, cache_dir: Path, weighting: dict, updates: dict[int, VersionUpdate], steps: int = 8):
    names, train_prefixes, _ = domain_prefixes
    spec = JobSpec.from_dict(
        {
            "name": "w",
            "domains": [{"name": n, "prefix": p} for n, p in zip(names, train_prefixes)],
            "weighting": weighting,
        }
    )
    cfg = TrainConfig(steps=steps, global_batch_size=8, lr=3e-3, seed=1)
    cfg.model.seq_length = 32
    datasets = build_domain_datasets(train_prefixes, 32, seed=1, num_samples=None, cache_dir=cache_dir)
    sampler = MixtureSampler(
        len(names), 8, [1.0] * len(names), fingerprint="w", dataset_lengths=[len(d) for d in datasets]
    )
    result = train(
        cfg,
        datasets,
        [],
        sampler,
        attachment=VersionScript(updates),
        progress=False,
        weighting=InstanceWeighting(spec),
    )
    return result, [s.extras["sample_weight"] for s in result.stats]


def test_loss_weighting_parameters_switch_with_the_version(domain_prefixes, cache_dir: Path) -> None:
    k = len(domain_prefixes[0])
    # The spec keeps the whole run in burn-in; version 1 (received at step 2, due at step 4) ends it.
    update = VersionUpdate(1, 4, (1.0,) * k, params={"weighting": {"burn_in": 0, "r": 0.1}})
    result, weights = run(
        domain_prefixes, cache_dir, {"name": "loss", "params": {"burn_in": 1000}}, {2: update}
    )
    assert result.versions == [0] * 4 + [1] * 4
    for step, w in enumerate(weights):
        assert (w.std() > 0.05) == (step >= 4), (step, w)


def test_dwm_model_from_the_version_blob(domain_prefixes, cache_dir: Path) -> None:
    k = len(domain_prefixes[0])
    builder = dwm.FeatureBuilder(num_domains=k, seq_len=32)
    params = dwm.init_params(builder.num_features, hidden=8, seed=3)
    params["w2"] = np.linspace(-2, 2, 8).astype(np.float32)  # a trained-looking output layer
    update = VersionUpdate(1, 3, (1.0,) * k, blob=dwm.to_bytes(params, builder))
    _result, weights = run(
        domain_prefixes, cache_dir, {"name": "dwm", "params": {"hidden": 8}}, {1: update}, steps=6
    )
    # A fresh model (zero output layer) gives exactly uniform weights until the blob's version applies.
    for step, w in enumerate(weights):
        assert np.allclose(w, 1.0) == (step < 3), (step, w)
        assert abs(w.sum() - 8) < 1e-4
