"""What a training run measured, and how each finished step is recorded and reported."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mixer.megatron.loss import HostStats

__all__ = ["RunLog", "TrainResult"]

log = logging.getLogger("mixer.megatron.train")


@dataclass
class TrainResult:
    """What a run measured, one entry per reported step (from its start or resume step)."""

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    sample_ids: list[np.ndarray] = field(default_factory=list)  # the global batch (all ranks)
    local_sample_ids: list[list[int]] = field(default_factory=list)  # this rank's slice
    stats: list[HostStats] = field(default_factory=list)
    val_history: list[tuple[int, np.ndarray]] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)
    applied: list[tuple[int, int]] = field(default_factory=list)  # (version, step it took effect)
    step_times: list[float] = field(default_factory=list)  # wall time of every step run
    attached: list[bool] = field(default_factory=list)  # whether that step was attached
    step_time_s: float = math.nan  # median wall time of a step, first two excluded
    final_step: int = 0

    def median_step_time(self, attached: bool) -> float:
        """Median step time of attached (or detached) steps, the first of each block excluded."""
        times = [
            t
            for i, (t, a) in enumerate(zip(self.step_times, self.attached))
            if a == attached and i > 0 and self.attached[i - 1] == a
        ]
        return float(np.median(times)) if times else math.nan


class RunLog:
    """Per-run bookkeeping: results, reports to the attachment, progress display."""

    def __init__(self, cfg: Any, attachment: Any, bar: tqdm) -> None:
        self.cfg = cfg
        self.attachment = attachment
        self.bar = bar
        self.result = TrainResult()
        self.versions: dict[int, int] = {}

    def emit(self, stats: HostStats | None) -> None:
        """Record one finished step and report it (stats arrive one step late)."""
        if stats is None:
            return
        version = self.versions.pop(stats.step)
        r = self.result
        r.steps.append(stats.step)
        r.losses.append(stats.loss)
        r.versions.append(version)
        r.sample_ids.append(stats.sample_id)
        r.stats.append(stats)
        self.bar.set_postfix(step=stats.step, loss=f"{stats.loss:.4f}", version=version, refresh=False)
        if self.cfg.log_every and (stats.step + 1) % self.cfg.log_every == 0:
            per_domain = np.array2string(stats.domain_mean_loss(), precision=3)
            log.info(
                "step %d loss %.4f version %d domain loss %s", stats.step, stats.loss, version, per_domain
            )
        if self.attachment is None:
            return
        x = stats.extras
        signals: dict[str, Any] = {
            k: x[k].astype(np.float64) for k in ("excess_loss_sum", "alignment") if k in x
        }
        if "sample_align" in x:
            signals["sample_align"] = x["sample_align"].astype(np.float32)
        if "grad_norm_mean" in x:
            signals["extra"] = {"grad_norm_mean": float(x["grad_norm_mean"])}
        if self.cfg.report_topics:
            signals["sample_topic"] = stats.sample_domain.astype(np.int32)
        self.attachment.report(
            step=stats.step,
            applied_version=version,
            domain_loss_sum=stats.domain_loss_sum,
            domain_token_count=stats.domain_token_count,
            domain_sample_count=stats.domain_sample_count,
            sample_loss=stats.sample_loss,
            sample_domain=stats.sample_domain,
            sample_id=stats.sample_id,
            **signals,
        )

    def validation(self, steps_done: int, losses: np.ndarray) -> None:
        """Record a balanced validation after steps_done steps and hand it to the attachment."""
        self.result.val_history.append((steps_done, losses))
        report = getattr(self.attachment, "report_validation", None)
        if report is not None:
            report(step=steps_done, domain_loss=losses)
