"""Offline replay: re-derive a job's versions from its log and compare them with the record.

Reads the database directly. Replaying a run with its own strategy from the start must
reproduce every stored version bit for bit; `verify` reports the first one that does not.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from mixer.engine import Engine, Version
from mixer.signals import Report
from mixer.spec import JobSpec
from mixer.store import Store
from mixer.v1 import mixer_pb2 as pb
from mixer.wire import report_from_proto
from mixer.signals import validate_report


@dataclass(slots=True)
class VerifyResult:
    job: str
    versions_checked: int
    reports: int
    ok: bool
    first_divergence: dict | None = None
    missing: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "job": self.job,
            "ok": self.ok,
            "versions_checked": self.versions_checked,
            "reports": self.reports,
            "first_divergence": self.first_divergence,
        }


def job_log(store: Store, name: str) -> tuple[JobSpec, int, Iterator[tuple[int, Report]]]:
    """A job's spec, id and its log in order as (log_seq, report)."""
    rec = store.get_job(name)
    if rec is None:
        raise KeyError(f"job {name!r} not found in {store.url}")
    spec = JobSpec.from_json(rec.spec_json)

    def reports() -> Iterator[tuple[int, Report]]:
        for s in store.signals(rec.id):
            yield s.seq, validate_report(report_from_proto(pb.Signals.FromString(s.payload)), spec.num_domains)

    return spec, rec.id, reports()


def verify(store: Store, name: str) -> VerifyResult:
    """Replay `name` from scratch with its own strategy and compare every stored version."""
    spec, job_id, log = job_log(store, name)
    stored = iter(store.versions(job_id))
    engine = Engine(spec)
    n_reports, checked = 0, 0

    def compare(derived: Version) -> dict | None:
        nonlocal checked
        try:
            rec, _ = next(stored)
        except StopIteration:
            return {"version": derived.version, "step": derived.effective_step, "reason": "derived a version that is not stored"}
        checked += 1
        if derived.same_as(rec):
            return None
        diff = float(np.max(np.abs(derived.weights - rec.weights))) if derived.weights.shape == rec.weights.shape else float("inf")
        return {
            "version": rec.version,
            "step": rec.effective_step,
            "trigger_step": rec.trigger_step,
            "max_abs_weight_diff": diff,
            "stored": rec.weights.tolist(),
            "derived": derived.weights.tolist(),
            "reason": "weights differ" if diff else "metadata differs (effective step, params or blob)",
        }

    bad = compare(engine.current)
    if bad is None:
        for seq, report in log:
            n_reports += 1
            v = engine.ingest(report, seq)
            if v is not None and (bad := compare(v)) is not None:
                break
    if bad is None:
        extra = next(stored, None)
        if extra is not None:
            bad = {"version": extra[0].version, "step": extra[0].effective_step, "reason": "stored version was not derived from the log"}
    return VerifyResult(name, checked, n_reports, bad is None, bad)
