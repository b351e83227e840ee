"""PRESENCE on the megatron-core GPT model: the probe's scores and the weights inside the step."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mixer.megatron.data import build_domain_datasets
from mixer.megatron.instance import InstanceWeighting
from mixer.megatron.model import ModelConfig, build_model, teardown, unwrap
from mixer.megatron.probes import SelfInfluenceProbe
from mixer.megatron.sampler import MixtureSampler
from mixer.megatron.train import TrainConfig, train
from mixer.spec import JobSpec

CASES = json.loads((Path(__file__).parents[1] / "weighting" / "data" / "presence_cases.json").read_text())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_probe_scores_equal_autograd_output_layer_gradient_norms(dtype: torch.dtype) -> None:
    cfg = ModelConfig(seq_length=16)
    model = build_model(cfg, "cpu", seed=0).to(dtype)
    probe = SelfInfluenceProbe(model)
    try:
        b, s = 4, cfg.seq_length
        g = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, cfg.vocab_size, (b, s), generator=g)
        labels = torch.randint(0, cfg.vocab_size, (b, s), generator=g)
        pos = torch.arange(s).expand(b, s)
        mask = (torch.rand(b, s, generator=g) < 0.8).float()
        batch = {"tokens": tokens, "labels": labels, "loss_mask": mask, "position_ids": pos}
        with probe.capture(batch):
            model(tokens, pos, None, labels=labels)
        got = probe.scores()
        with pytest.raises(RuntimeError, match="capture"):
            probe.scores()
        W = unwrap(model).output_layer.weight
        want = []
        for i in range(b):  # one sample at a time: its own token-mean loss, its own gradient
            per_token = model(tokens[i : i + 1], pos[i : i + 1], None, labels=labels[i : i + 1])
            loss = (per_token[0] * mask[i].to(per_token.dtype)).sum() / mask[i].sum()
            (gW,) = torch.autograd.grad(loss, W)
            want.append(gW.double().square().sum())
        # megatron's cross entropy runs in float32 whatever the model's dtype.
        torch.testing.assert_close(got.double(), torch.stack(want), rtol=1e-5, atol=0)
    finally:
        probe.close()
        teardown()


def test_training_step_applies_presence_weights_and_switches_stage(domain_prefixes, cache_dir) -> None:
    names, train_prefixes, _ = domain_prefixes
    params = CASES["weight_cases"][2]["params"]  # switch_step inside the run
    spec = JobSpec.from_dict(
        {
            "name": "p",
            "domains": [{"name": n, "prefix": p} for n, p in zip(names, train_prefixes)],
            "weighting": {"name": "presence", "params": params},
        }
    )
    steps = params["switch_step"] + 2
    cfg = TrainConfig(steps=steps, global_batch_size=8, lr=3e-3, seed=1)
    cfg.model.seq_length = 32
    datasets = build_domain_datasets(train_prefixes, 32, seed=1, num_samples=None, cache_dir=cache_dir)
    sampler = MixtureSampler(
        len(names), 8, [1.0] * len(names), fingerprint="p", dataset_lengths=[len(d) for d in datasets]
    )
    result = train(cfg, datasets, [], sampler, progress=False, weighting=InstanceWeighting(spec))
    assert result.steps == list(range(steps))
    for step, stats in zip(result.steps, result.stats):
        s = stats.extras["sample_self_influence"].astype(np.float64)
        w = stats.extras["sample_weight"].astype(np.float64)
        assert s.shape == w.shape == (8,) and np.all(s > 0)
        tau = params["tau_1"] if step < params["switch_step"] else params["tau_2"]
        x = s / tau
        want = 8 * np.exp(x - x.max()) / np.exp(x - x.max()).sum()
        np.testing.assert_allclose(w, want, rtol=1e-5)
        # Stage 1 puts the most weight on the highest score, stage 2 on the lowest.
        assert np.argmax(w) == (np.argmax(s) if step < params["switch_step"] else np.argmin(s))
