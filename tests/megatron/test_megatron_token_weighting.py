"""PRIOR's token weights from the frozen reference model DoReMi's probe already runs: one
reference forward gives both the excess loss and p_ref, and the training step applies the weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from mixer.megatron.loss import compute_loss
from mixer.megatron.model import ModelConfig, build_model, teardown
from mixer.megatron.probes import ExcessLossProbe
from mixer.weighting import parse_weighting_params
from mixer.weighting.token import token_weights, token_weights_np

CASES = json.loads((Path(__file__).parents[1] / "weighting" / "data" / "token_cases.json").read_text())[
    "cases"
]


def test_reference_forward_serves_excess_loss_and_prior_weights() -> None:
    cfg = ModelConfig(seq_length=16)
    K = 3
    try:
        model = build_model(cfg, "cpu", seed=0)
        probe = ExcessLossProbe(build_model(cfg, "cpu", seed=1), K)
        b, s = 4, cfg.seq_length
        g = torch.Generator().manual_seed(2)
        tokens = torch.randint(0, cfg.vocab_size, (b, s), generator=g)
        labels = torch.randint(0, cfg.vocab_size, (b, s), generator=g)
        pos = torch.arange(s).expand(b, s)
        mask = (torch.rand(b, s, generator=g) < 0.8).float()
        domain = torch.tensor([0, 2, 2, 1])
        batch = {
            "tokens": tokens,
            "labels": labels,
            "loss_mask": mask,
            "position_ids": pos,
            "dataset_id": domain,
        }
        per_token = model(tokens, pos, None, labels=labels)
        ref_loss = probe.reference_token_loss(batch)
        assert not ref_loss.requires_grad
        # -log p_ref(label) from the reference's own logits, in float64.
        with torch.no_grad():
            logits = probe.reference(tokens, pos, None).double()
        if logits.shape[:2] != (b, s):
            logits = logits.transpose(0, 1)
        want_ref = -torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
        np.testing.assert_allclose(ref_loss.double().numpy(), want_ref.numpy(), rtol=1e-4, atol=1e-5)
        # One forward for both signals: passing it gives DoReMi's excess loss unchanged.
        torch.testing.assert_close(probe.measure(batch, per_token, ref_loss), probe.measure(batch, per_token))
        for case in (c for c in CASES if c["method"] == "token-reference"):
            p = parse_weighting_params("token-reference", case["params"])
            w = token_weights("token-reference", p, 0, per_token, mask, ref_loss)
            want = token_weights_np("token-reference", None, mask.numpy(), want_ref.numpy(), p.alpha)
            np.testing.assert_allclose(w.double().numpy(), want, rtol=1e-4, atol=1e-6)
            loss, _ = compute_loss(per_token, mask, domain, K, token_weights=w)
            want_loss = (want * per_token.detach().double().numpy() * mask.numpy()).sum() / mask.numpy().sum()
            np.testing.assert_allclose(loss.item(), want_loss, rtol=1e-5)
        loss.backward()
        assert all(p.grad is None for p in probe.reference.parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    finally:
        teardown()


def test_training_loop_applies_token_weights_and_reports_their_domain_means(
    domain_prefixes, cache_dir
) -> None:
    """TLDR in the plain loop: per step, each domain's token-weight sum and token count; the weights
    are rescaled so that they sum to the step's token count."""
    from mixer.megatron.data import build_domain_datasets
    from mixer.megatron.instance import InstanceWeighting
    from mixer.megatron.sampler import MixtureSampler
    from mixer.megatron.train import TrainConfig, train
    from mixer.spec import JobSpec

    names, train_prefixes, _ = domain_prefixes
    spec = JobSpec.from_dict(
        {
            "name": "t",
            "domains": [{"name": n, "prefix": p} for n, p in zip(names, train_prefixes)],
            "weighting": {"name": "token-loss"},
        }
    )
    cfg = TrainConfig(steps=3, global_batch_size=8, lr=3e-3, seed=1)
    cfg.model.seq_length = 32
    datasets = build_domain_datasets(train_prefixes, 32, seed=1, num_samples=None, cache_dir=cache_dir)
    sampler = MixtureSampler(
        len(names), 8, [1.0] * len(names), fingerprint="t", dataset_lengths=[len(d) for d in datasets]
    )
    result = train(cfg, datasets, [], sampler, progress=False, weighting=InstanceWeighting(spec))
    K = len(names)
    for stats in result.stats:
        tw = stats.extras["token_weight"].astype(np.float64)
        sums, counts = tw[:K], tw[K:]
        assert counts.sum() > 0 and np.all(sums >= 0) and np.all(sums <= 2 * counts + 1e-6)
        np.testing.assert_allclose(sums.sum(), counts.sum(), rtol=1e-5)  # rescaled to the token count
        np.testing.assert_allclose(counts, stats.domain_token_count, rtol=0, atol=0)
