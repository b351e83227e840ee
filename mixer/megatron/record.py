"""What a training run measured, and how each finished step is recorded and reported."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mixer.megatron.loss import HostStats
from mixer.weighting.token import report_extra

__all__ = ["RunLog", "TrainResult"]

log = logging.getLogger("mixer.megatron.train")


class Recent(list):
    """A list that keeps only its last `maxlen` items: per-step records in bounded memory."""

    def __init__(self, maxlen: int) -> None:
        super().__init__()
        self.maxlen = maxlen

    def append(self, item: Any) -> None:
        super().append(item)
        if len(self) > self.maxlen:
            del self[: len(self) - self.maxlen]


@dataclass
class TrainResult:
    """What a run measured: summaries, and the most recent `keep` steps' records (bounded memory).

    Every reported step goes to TrainConfig.record (a JSONL file) when one is given; in memory a
    run holds O(keep) per-step entries however long it trains.
    """

    keep: int = 1024
    steps: list[int] = field(init=False)
    losses: list[float] = field(init=False)
    versions: list[int] = field(init=False)
    sample_ids: list[np.ndarray] = field(init=False)  # the global batch (all ranks)
    local_sample_ids: list[list[int]] = field(init=False)  # this rank's slice
    stats: list[HostStats] = field(init=False)
    step_times: list[float] = field(init=False)  # wall time of the most recent steps run
    attached: list[bool] = field(init=False)  # whether that step was attached
    val_history: list[tuple[int, np.ndarray]] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)
    applied: list[tuple[int, int]] = field(default_factory=list)  # (version, step it took effect)
    step_time_s: float = math.nan  # median wall time of a step, first two excluded
    final_step: int = 0
    reported_steps: int = 0  # every step reported, including those no longer kept
    signal_counts: dict[str, int] = field(default_factory=dict)  # probe results reported, by signal

    def __post_init__(self) -> None:
        for name in ("steps", "losses", "versions", "sample_ids", "local_sample_ids", "stats"):
            setattr(self, name, Recent(self.keep))
        # Step-time medians need a few thousand samples, not the whole run.
        self.step_times, self.attached = Recent(max(self.keep, 4096)), Recent(max(self.keep, 4096))

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

    def __init__(self, cfg: Any, attachment: Any, bar: tqdm, record: bool = True) -> None:
        self.cfg = cfg
        self.attachment = attachment
        self.bar = bar
        self.result = TrainResult(keep=cfg.keep_steps)
        self.versions: dict[int, int] = {}
        path = getattr(cfg, "record", None)
        self._file = None
        if record and path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._file = Path(path).open("a", encoding="utf-8")  # noqa: SIM115 - open for the whole run; close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _write(self, stats: HostStats, version: int) -> None:
        """One JSON line per reported step: what the step measured, as the service received it."""
        line = {
            "step": stats.step,
            "loss": stats.loss,
            "version": version,
            "domain_loss_sum": stats.domain_loss_sum.tolist(),
            "domain_token_count": stats.domain_token_count.tolist(),
            "domain_sample_count": stats.domain_sample_count.tolist(),
            "sample_id": stats.sample_id.tolist(),
            "sample_loss": stats.sample_loss.tolist(),
            **{k: np.asarray(v).tolist() for k, v in stats.extras.items()},
        }
        self._file.write(json.dumps(line) + "\n")

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
        r.reported_steps += 1
        for k in stats.extras:
            r.signal_counts[k] = r.signal_counts.get(k, 0) + 1
        if self._file is not None:
            self._write(stats, version)
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
            if "lr" in x:  # the learning rate of the probed step: DGA/DoGE scale their step by it
                signals["extra"]["lr"] = float(x["lr"])
        if "token_weight" in x:  # TLDR / PRIOR: each domain's mean token weight
            signals.setdefault("extra", {}).update(report_extra(x["token_weight"], stats.domain_loss_sum.size))
        if "sample_topic" in x:  # rows of topic ids, -1 padded (gathered flat over ranks)
            rows = x["sample_topic"].reshape(stats.sample_loss.shape[0], -1).astype(np.int32)
            signals["sample_topic"] = rows[:, : max(1, int((rows >= 0).sum(axis=1).max(initial=0)))]
        stats.report_to(self.attachment, version, **signals)

    def validation(self, steps_done: int, losses: np.ndarray) -> None:
        """Record a balanced validation after steps_done steps and hand it to the attachment."""
        self.result.val_history.append((steps_done, losses))
        report = getattr(self.attachment, "report_validation", None)
        if report is not None:
            report(step=steps_done, domain_loss=losses)
