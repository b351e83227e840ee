"""Loss hook: token-mean loss, per-domain/per-sample statistics, host copies, DP reduction."""

from __future__ import annotations

from pathlib import Path

import _dist_worker
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from mixer.megatron.loss import AsyncHostCopy, compute_loss
from mixer.megatron.model import _free_port


def make_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token losses [5, 7] needing grad, a loss mask with an all-zero row, domain ids."""
    g = torch.Generator().manual_seed(seed)
    per_token = torch.rand(5, 7, generator=g).requires_grad_()
    mask = (torch.rand(5, 7, generator=g) > 0.3).float()
    mask[3] = 0
    return per_token, mask, torch.tensor([0, 2, 0, 1, 2])


def test_token_mean_loss_and_statistics() -> None:
    per_token, mask, domain = make_batch()
    loss, stats = compute_loss(per_token, mask, domain, 4, sample_id=torch.arange(5) + 100)
    expected = (per_token * mask).sum() / mask.sum()
    assert torch.allclose(loss, expected)
    loss.backward()
    assert per_token.grad is not None
    sums = (per_token * mask).sum(1).detach()
    tokens = mask.sum(1)
    assert torch.allclose(stats.sample_loss, sums / tokens.clamp(min=1))
    assert stats.sample_loss[3] == 0  # a fully masked sample reports 0, not NaN
    assert torch.allclose(
        stats.domain_loss_sum,
        torch.stack([sums[[0, 2]].sum(), sums[3], sums[[1, 4]].sum(), torch.tensor(0.0)]),
    )
    assert stats.domain_token_count.tolist() == [
        tokens[[0, 2]].sum().item(),
        0.0,
        tokens[[1, 4]].sum().item(),
        0.0,
    ]
    assert stats.domain_sample_count.tolist() == [2, 1, 2, 0]
    assert stats.domain_sample_count.dtype == torch.int64
    assert stats.sample_domain.dtype == torch.int32 and stats.sample_id.tolist() == [100, 101, 102, 103, 104]
    assert not any(t.requires_grad for t in vars(stats).values())


def test_instance_weights() -> None:
    per_token, mask, domain = make_batch(1)
    w = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.0], requires_grad=True)
    loss, stats = compute_loss(per_token, mask, domain, 3, instance_weights=w)
    s, t = (per_token * mask).sum(1), mask.sum(1)
    # The weighted loss sum over the unweighted token count (Sow et al.'s reference).
    assert torch.allclose(loss, (w * s).sum() / t.sum())
    halves, _ = compute_loss(per_token, mask, domain, 3, instance_weights=w, normalizer=t.sum() / 2)
    assert torch.allclose(halves, 2 * loss)
    ones, _ = compute_loss(per_token, mask, domain, 3, instance_weights=torch.ones(5))
    plain, plain_stats = compute_loss(per_token, mask, domain, 3)
    assert torch.allclose(ones, plain)
    assert torch.equal(stats.domain_loss_sum, plain_stats.domain_loss_sum)  # stats stay unweighted
    loss.backward()
    assert w.grad is None  # the weights are treated as constants


def test_async_host_copy_returns_previous_step() -> None:
    copier = AsyncHostCopy()
    per_token, mask, domain = make_batch()
    seen = []
    for step in range(4):
        _, stats = compute_loss(per_token.detach() * (step + 1), mask, domain, 3)
        prev = copier.push(step, stats)
        if step == 0:
            assert prev is None
        else:
            assert prev is not None and prev.step == step - 1
            seen.append(prev)
    last = copier.flush()
    assert last is not None and last.step == 3 and copier.flush() is None
    seen.append(last)
    # Each step's arrays are its own (buffer reuse must not overwrite earlier reads).
    base = seen[0].domain_loss_sum
    for k, host in enumerate(seen):
        np.testing.assert_allclose(host.domain_loss_sum, base * (k + 1), rtol=1e-6)
        assert host.domain_loss_sum.dtype == np.float64 and host.domain_sample_count.dtype == np.int64
        assert host.sample_loss.dtype == np.float32 and host.sample_domain.dtype == np.int32
        assert host.sample_id.dtype == np.int64 and host.sample_loss.shape == (5,)
    means = seen[0].domain_mean_loss()
    assert np.isnan(means[1])  # domain 1 holds only the fully masked sample: no tokens
    assert means[0] == pytest.approx(seen[0].domain_loss_sum[0] / seen[0].domain_token_count[0])


@pytest.mark.timeout(60)
def test_data_parallel_reduction_over_two_processes(tmp_path: Path) -> None:
    mp.spawn(_dist_worker.run, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    batches = [_dist_worker.batch_for(r) for r in range(2)]
    per_token = torch.cat([b[0] for b in batches])
    mask = torch.cat([b[1] for b in batches])
    domain = torch.cat([b[2] for b in batches])
    ids = torch.cat([b[3] for b in batches])
    _, whole = compute_loss(per_token, mask, domain, 3, sample_id=ids)
    for got in results:
        assert torch.allclose(got["domain_loss_sum"], whole.domain_loss_sum)
        assert torch.equal(got["domain_token_count"], whole.domain_token_count)
        assert torch.equal(got["domain_sample_count"], whole.domain_sample_count)
        assert torch.allclose(got["sample_loss"], whole.sample_loss)
        assert torch.equal(got["sample_id"], ids) and torch.equal(got["sample_domain"], whole.sample_domain)
