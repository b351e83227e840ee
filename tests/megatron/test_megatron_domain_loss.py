"""Per-domain loss weights (DoReMi's paper mode): the trainers' loss against a float64 recomputation.

loss = sum_b c_{d_b} w_b S_b / N, with S_b a sample's masked loss sum, c the version's
domain_loss_weights, w_b the instance weight and N the unweighted token count of the global batch.
"""

from __future__ import annotations

from pathlib import Path

import _domain_loss_worker as worker
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from mixer.megatron.data import build_domain_datasets
from mixer.megatron.instance import InstanceWeighting
from mixer.megatron.loss import compute_loss, parse_domain_loss_weights
from mixer.megatron.model import _free_port
from mixer.megatron.sampler import MixtureSampler, split_sample_id
from mixer.megatron.train import TrainConfig, train
from mixer.megatron.versions import VersionUpdate
from mixer.spec import JobSpec


def expected_loss(per_token, mask, domain, c, w=None) -> tuple[float, np.ndarray]:
    """The loss and its gradient with respect to the per-token losses, in float64."""
    per_token = np.asarray(per_token, np.float64)
    mask = np.asarray(mask, np.float64)
    scale = np.asarray(c, np.float64)[np.asarray(domain)]
    if w is not None:
        scale = scale * np.asarray(w, np.float64)
    N = mask.sum()
    return float((scale[:, None] * per_token * mask).sum() / N), scale[:, None] * mask / N


def test_compute_loss_applies_domain_loss_weights() -> None:
    per_token, mask, domain, _ = worker.batch_for(0)
    c = torch.tensor(worker.LOSS_WEIGHTS)
    w = torch.tensor([1.0, 0.5, 2.0, 0.0])
    for inst in (None, w):
        leaf = per_token.clone().requires_grad_()
        loss, stats = compute_loss(leaf, mask, domain, worker.K, instance_weights=inst, domain_loss_weights=c)
        loss.backward()
        exp_loss, exp_grad = expected_loss(per_token, mask, domain, worker.LOSS_WEIGHTS, inst)
        assert loss.item() == pytest.approx(exp_loss, rel=1e-6)
        np.testing.assert_allclose(leaf.grad.numpy(), exp_grad, rtol=1e-6, atol=1e-9)
        # The statistics stay unweighted.
        sums = (per_token.double() * mask.double()).sum(1).numpy()
        np.testing.assert_allclose(
            stats.domain_loss_sum.numpy(), np.bincount(domain.numpy(), sums, minlength=worker.K), rtol=1e-6
        )
    with pytest.raises(ValueError, match="2 domain loss weights for 3 domains"):
        compute_loss(per_token, mask, domain, worker.K, domain_loss_weights=torch.ones(2))


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ([1.0, 2.0], r"need a list of 3 numbers, got 2 entries"),
        ("1,2,3", r"need a list of 3 numbers"),
        ([1.0, -0.5, 1.0], r"domain_loss_weights\[1\] = -0.5"),
        ([1.0, float("nan"), 1.0], r"domain_loss_weights\[1\] = nan"),
        ([1.0, 1.0, 2e6], r"domain_loss_weights\[2\] = 2000000.0"),
        ([True, 1.0, 1.0], r"domain_loss_weights\[0\] = True"),
    ],
)
def test_bad_domain_loss_weights_are_refused(value, match) -> None:
    with pytest.raises(ValueError, match=match):
        parse_domain_loss_weights({"domain_loss_weights": value}, 3)
    assert parse_domain_loss_weights({}, 3) is None


def test_instance_weighting_follows_the_version_and_its_checkpoint() -> None:
    _, _, domain, _ = worker.batch_for(1)
    loss = torch.rand(4)
    weighting = InstanceWeighting(worker.spec())
    assert weighting.enabled  # mode paper, weighting none: the loss weights are the whole weighting
    torch.testing.assert_close(weighting.weights(0, loss, domain), torch.ones(4))  # before any version
    weighting.offer(VersionUpdate(3, 5, (1 / 3,) * 3, params={"domain_loss_weights": worker.LOSS_WEIGHTS}))
    weighting.sync(3)
    expected = torch.tensor(worker.LOSS_WEIGHTS)[domain]
    torch.testing.assert_close(weighting.weights(5, loss, domain), expected)
    again = InstanceWeighting(worker.spec())
    again.load_state_dict(weighting.state_dict())
    torch.testing.assert_close(again.weights(6, loss, domain), expected)
    online = JobSpec.from_dict(
        {"name": "o", "domains": ["a", "b"], "strategy": {"name": "doremi", "params": {"mode": "online"}}}
    )
    assert not InstanceWeighting(online).enabled


@pytest.mark.timeout(120)
def test_two_ranks_plain_loop_and_plugin_micro_batches_match_float64(tmp_path: Path) -> None:
    mp.spawn(worker.run, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    batches = [worker.batch_for(r) for r in range(2)]
    per_token = torch.cat([b[0] for b in batches])
    mask = torch.cat([b[1] for b in batches])
    domain = torch.cat([b[2] for b in batches])
    exp_loss, exp_grad = expected_loss(per_token, mask, domain, worker.LOSS_WEIGHTS)
    for r, got in enumerate(results):
        rows = slice(4 * r, 4 * r + 4)
        torch.testing.assert_close(got["weights"], torch.tensor(worker.LOSS_WEIGHTS)[batches[r][2]])
        assert got["plain_loss"].item() == pytest.approx(exp_loss, rel=1e-6)
        # The ranks' gradients averaged are the global loss's gradient: each rank holds world x its rows.
        np.testing.assert_allclose(got["plain_grad"].numpy() / 2, exp_grad[rows], rtol=1e-6, atol=1e-9)
        assert got["plugin_loss"].item() == pytest.approx(exp_loss, rel=1e-6)
        # Megatron divides the summed loss by the global token count: the gradient of the loss sum
        # is the weighted mask, N times the global loss's.
        N = float(mask.sum())
        np.testing.assert_allclose(got["plugin_grad"].numpy() / N, exp_grad[rows], rtol=1e-6, atol=1e-9)
    record = results[0]["plugin_record"]
    assert results[1]["plugin_record"] is None
    sums = (per_token.double() * mask.double()).sum(1).numpy()
    np.testing.assert_allclose(
        record["domain_loss_sum"], np.bincount(domain.numpy(), sums, minlength=worker.K), rtol=1e-6
    )


class VersionScript:
    """Hands out prepared versions by step (poll_version); reports are dropped."""

    def __init__(self, updates: dict[int, VersionUpdate]) -> None:
        self.updates = updates

    def poll(self):
        raise AssertionError("poll_version should be used")

    def poll_version(self, step: int) -> VersionUpdate | None:
        return self.updates.get(step)

    def report(self, **kwargs) -> None:
        pass


@pytest.mark.timeout(300)
def test_plain_loop_weights_each_sample_by_the_applied_versions_loss_weights(
    domain_prefixes, cache_dir
) -> None:
    names, train_prefixes, _ = domain_prefixes
    K = len(names)
    spec = JobSpec.from_dict(
        {
            "name": "dl-train",
            "domains": [{"name": n, "prefix": p} for n, p in zip(names, train_prefixes)],
            "strategy": {"name": "doremi"},
        }
    )
    c = [0.5 + i for i in range(K)]
    # Version 1 arrives at step 1 and takes effect at step 3; the sampling weights stay uniform.
    updates = {1: VersionUpdate(1, 3, (1 / K,) * K, params={"domain_loss_weights": c})}
    cfg = TrainConfig(steps=6, global_batch_size=8, lr=3e-3, seed=1)
    cfg.model.seq_length = 32
    datasets = build_domain_datasets(train_prefixes, 32, seed=1, num_samples=None, cache_dir=cache_dir)
    sampler = MixtureSampler(K, 8, [1.0] * K, fingerprint="dl", dataset_lengths=[len(d) for d in datasets])
    result = train(
        cfg,
        datasets,
        [],
        sampler,
        attachment=VersionScript(updates),
        progress=False,
        weighting=InstanceWeighting(spec),
    )
    assert result.versions == [0] * 3 + [1] * 3
    for s in result.stats:
        doms = np.asarray([split_sample_id(int(i))[0] for i in s.sample_id])
        expected = np.asarray(c)[doms] if s.step >= 3 else np.ones(len(doms))
        np.testing.assert_allclose(s.extras["sample_weight"], expected, rtol=1e-6)
        # Full sequences: the step's loss is the weighted mean of the per-sample token means.
        np.testing.assert_allclose(s.loss, float((expected * s.sample_loss).mean()), rtol=1e-5)
