"""CPU training with live weights: loss falls, stats reach the attachment, resume is exact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mixer.megatron.data import build_domain_datasets
from mixer.megatron.sampler import FingerprintMismatchError, MixtureSampler
from mixer.megatron.train import Attachment, TrainConfig, train


class ScriptedAttachment:
    """Hands out prepared versions at given poll counts and records every report."""

    def __init__(self, updates: dict[int, tuple[int, list[float], int]], first_poll: int = 0) -> None:
        self.updates = updates
        self.polls = first_poll
        self.reports: list[dict[str, Any]] = []
        self.validations: list[tuple[int, np.ndarray]] = []

    def poll(self) -> tuple[int, list[float], int] | None:
        update = self.updates.get(self.polls)
        self.polls += 1
        return update

    def report(self, **kwargs: Any) -> None:
        self.reports.append(kwargs)

    def report_validation(self, step: int, domain_loss: np.ndarray) -> None:
        self.validations.append((step, domain_loss))


def setup(domain_prefixes, cache_dir: Path, steps: int, fp: str = "job-a"):
    """Datasets, validation sets and a fresh sampler for a run of `steps` steps."""
    names, train_prefixes, val_prefixes = domain_prefixes
    cfg = TrainConfig(steps=steps, global_batch_size=8, lr=3e-3, seed=1)
    cfg.model.seq_length = 32
    datasets = build_domain_datasets(train_prefixes, 32, seed=1, num_samples=steps * 8, cache_dir=cache_dir)
    vals = build_domain_datasets(val_prefixes, 32, seed=1, num_samples=None, cache_dir=cache_dir)
    sampler = MixtureSampler(
        len(names), 8, [1.0] * len(names), fingerprint=fp, dataset_lengths=[len(d) for d in datasets]
    )
    return cfg, datasets, vals, sampler


def test_twenty_steps_loss_falls_and_stats_reach_the_attachment(domain_prefixes, cache_dir: Path) -> None:
    cfg, datasets, vals, sampler = setup(domain_prefixes, cache_dir, steps=20)
    cfg.eval_every = 10
    k = len(datasets)
    # Version 1 arrives at the 4th poll (step 3) and takes effect at step 6: domain 2 is switched off.
    weights = [1.0] * k
    weights[2] = 0.0
    attachment = ScriptedAttachment({3: (1, weights, 6)})
    assert isinstance(attachment, Attachment)
    result = train(cfg, datasets, vals, sampler, attachment=attachment, progress=False)

    assert result.steps == list(range(20)) and result.final_step == 20
    assert np.mean(result.losses[-5:]) < np.mean(result.losses[:5]) - 0.3
    assert result.versions == [0] * 6 + [1] * 14
    assert [r["step"] for r in attachment.reports] == list(range(20))
    for r, loss in zip(attachment.reports, result.losses):
        assert r["domain_loss_sum"].shape == (k,) and r["domain_loss_sum"].dtype == np.float64
        assert r["domain_token_count"].shape == (k,) and r["domain_token_count"].dtype == np.float64
        assert r["domain_sample_count"].dtype == np.int64 and r["domain_sample_count"].sum() == 8
        assert r["sample_loss"].shape == (8,) and r["sample_loss"].dtype == np.float32
        assert r["sample_domain"].dtype == np.int32 and r["sample_id"].dtype == np.int64
        assert np.array_equal(r["sample_id"] >> 40, r["sample_domain"])
        # The reported sums agree with the optimised token-mean loss.
        assert r["domain_loss_sum"].sum() / r["domain_token_count"].sum() == pytest.approx(loss, rel=1e-5)
        if r["step"] >= 6:
            assert r["applied_version"] == 1 and r["domain_sample_count"][2] == 0
        else:
            assert r["applied_version"] == 0 and r["domain_sample_count"].tolist() == [2] * k
    assert [s for s, _ in result.val_history] == [10, 20]
    assert all(v.shape == (k,) and np.all(np.isfinite(v)) for _, v in result.val_history)
    assert [s for s, _ in attachment.validations] == [10, 20]
    assert result.step_time_s > 0


def test_resume_from_checkpoint_is_exact(domain_prefixes, tmp_path: Path) -> None:
    k = len(domain_prefixes[0])
    new_weights = [float(i + 1) for i in range(k)]
    # Version 1 is received at step 3 but due at step 7: it is still pending in the step-5 checkpoint.
    cfg, datasets, _, sampler = setup(domain_prefixes, tmp_path / "cache-a", steps=10)
    cfg.checkpoint_dir, cfg.checkpoint_every = tmp_path / "ckpt", 5
    full = train(
        cfg, datasets, [], sampler, attachment=ScriptedAttachment({3: (1, new_weights, 7)}), progress=False
    )
    assert [c.name for c in full.checkpoints] == ["step_00000005", "step_00000010"]

    cfg, datasets, _, sampler = setup(domain_prefixes, tmp_path / "cache-b", steps=10)
    cfg.resume_from = tmp_path / "ckpt" / "step_00000005"
    # The service re-sends version 1 after the restart; the sampler already holds it and ignores it.
    attachment = ScriptedAttachment({5: (1, new_weights, 7)}, first_poll=5)
    resumed = train(cfg, datasets, [], sampler, attachment=attachment, progress=False)

    assert resumed.steps == list(range(5, 10))
    assert resumed.versions == full.versions[5:] == [0, 0, 1, 1, 1]
    for a, b in zip(full.sample_ids[5:], resumed.sample_ids):
        assert np.array_equal(a, b)
    assert resumed.losses == full.losses[5:]  # bit-identical, not merely close
    assert [r["step"] for r in attachment.reports] == list(range(5, 10))


def test_resume_with_another_job_spec_is_refused(domain_prefixes, tmp_path: Path) -> None:
    cfg, datasets, _, sampler = setup(domain_prefixes, tmp_path / "cache", steps=2)
    cfg.checkpoint_dir = tmp_path / "ckpt"
    train(cfg, datasets, [], sampler, progress=False)
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step_00000002"

    cfg, datasets, _, sampler = setup(domain_prefixes, tmp_path / "cache", steps=3, fp="job-b")
    cfg.resume_from = tmp_path / "ckpt"
    with pytest.raises(FingerprintMismatchError):
        train(cfg, datasets, [], sampler, progress=False)
    cfg.force_resume = True
    result = train(cfg, datasets, [], sampler, progress=False)
    assert result.steps == [2]


def test_a_long_run_keeps_bounded_records_and_streams_every_step(domain_prefixes, tmp_path: Path) -> None:
    import json

    cfg, datasets, _, sampler = setup(domain_prefixes, tmp_path / "cache", steps=12)
    cfg.keep_steps, cfg.record = 4, tmp_path / "steps.jsonl"
    result = train(cfg, datasets, [], sampler, attachment=ScriptedAttachment({}), progress=False)
    # In memory: the last keep_steps steps; on disk: every step, as reported.
    assert result.steps == list(range(8, 12)) and len(result.sample_ids) == len(result.stats) == 4
    assert result.reported_steps == 12
    lines = [json.loads(x) for x in cfg.record.read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(12))
    assert lines[-1]["sample_id"] == result.sample_ids[-1].tolist()
    assert lines[-1]["loss"] == result.losses[-1]


def test_resume_with_more_steps_keeps_the_learning_rate_schedule(domain_prefixes, tmp_path: Path) -> None:
    from mixer.megatron.train import lr_factor

    cfg, datasets, _, sampler = setup(domain_prefixes, tmp_path / "cache", steps=6)
    cfg.checkpoint_dir = tmp_path / "ckpt"
    train(cfg, datasets, [], sampler, progress=False)
    planned = TrainConfig(steps=6, lr=cfg.lr, min_lr=cfg.min_lr)
    # Extending the run to 10 steps continues the cosine that ended at step 6: min_lr from there,
    # no jump back up (the extended run's own cosine would be at ~half the peak at step 6).
    for override, expect in ((False, lambda s: lr_factor(s, planned)), (True, None)):
        cfg, datasets, _, sampler = setup(domain_prefixes, tmp_path / f"cache-{override}", steps=10)
        cfg.resume_from, cfg.override_lr_schedule = tmp_path / "ckpt", override
        lrs: list[float] = []
        train(
            cfg,
            datasets,
            [],
            sampler,
            progress=False,
            on_step=lambda s, c=cfg, out=lrs: out.append(lr_factor(s, c)),
        )
        if expect is not None:
            assert lrs == [expect(s) for s in range(6, 10)]
            assert cfg.decay_steps == 6
        else:
            assert lrs == [
                lr_factor(s, TrainConfig(steps=10, lr=cfg.lr, min_lr=cfg.min_lr)) for s in range(6, 10)
            ]
            assert lrs[0] > 2 * lr_factor(6, planned)
