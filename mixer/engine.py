"""One job's state machine: signals in log order -> strategy -> weight versions.

The engine is pure and deterministic: the server, replay and the tests drive the same code.
It never sees arrival times, only the log order (`log_seq`) the store assigned. Every update
produces a `Version`: a monotonic number, the step it takes effect at, the shaped weights and
the strategy's parameters. `snapshot()` / `Engine.restore()` carry the whole state exactly, so
restart = newest snapshot + the log after it, and that reproduces the same versions as a
replay from the start.

Guardrails against collapse, per job in the spec's cadence, are applied here on every version,
so the server, a restart and a replay all serve and store the same weights: the floor and cap
(`min_weight`, `max_weight`, in `mixer.shaping.shape_weights`), a bound on how far one version
may move from the last (`max_step_l1`, in `mixer.shaping.bound_step`), and a starvation detector
(`starvation_versions`: the domains at their floor for that many consecutive versions are listed
in the version's `params["starving"]`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from mixer.shaping import bound_step, shape_weights
from mixer.signals import MAX_STEP, PER_DOMAIN_FIELDS, PER_SAMPLE_FIELDS, Report, SignalError, Window
from mixer.spec import JobSpec, SpecError
from mixer.strategies import Strategy, build_strategy
from mixer.strategies.base import decode_state, encode_state
from mixer.types import Version  # re-exported: `from mixer.engine import Version` keeps working

STARVING_TOLERANCE = 1e-12
"""A weight within this of `cadence.min_weight` is at the floor (with no floor: below 1e-12)."""


def at_floor(weights: np.ndarray, min_weight: float) -> np.ndarray:
    """Which domains sit at the floor (a bool per domain)."""
    return np.asarray(weights, dtype=np.float64) <= min_weight + STARVING_TOLERANCE


class Engine:
    """Consumes one job's reports in log order and emits versions."""

    def __init__(self, spec: JobSpec, strategy: Strategy | None = None):
        self.spec = spec
        self.strategy = strategy or build_strategy(spec)
        self.state = self.strategy.init(spec.seed)
        self._state_nans: int | None = None
        """NaNs in `state` (None: not counted since it last changed): the guard's "before"."""
        self.prior = np.asarray(spec.prior())
        initial = getattr(self.strategy, "initial_weights", None)
        w0 = initial(self.state) if initial else self.prior
        # Workers read their instance-weighting parameters from every version.
        self.weighting = {"weighting": spec.served_weighting_params} if spec.weighting.name != "none" else {}
        if not np.isfinite(np.asarray(w0, dtype=np.float64)).all() or _nonfinite(self.state)[0]:
            raise SpecError("strategy.params", f"the {spec.strategy.name!r} strategy's initial weights or state are not finite for this spec")
        c = spec.cadence
        self.target: np.ndarray | None = None
        """With `cadence.max_step_l1`: the shaped proposal the served weights still move toward
        (None once they reach it). Every update moves on toward it, even one whose strategy
        made no new decision (a static schedule's step change is a single decision)."""
        self.floor_run: np.ndarray | None = None if c.starvation_versions is None else np.zeros(spec.num_domains, dtype=np.int64)
        """With `cadence.starvation_versions`: per domain, consecutive versions at the floor, the current one included."""
        w = shape_weights(w0, self.prior, c)
        self.current = Version(0, 0, w, {**self.weighting, **self._starvation(w)})
        self.pending: list[Report] = []
        self.next_update_step = c.warmup_steps + c.update_every - 1
        self.max_step = -1
        self.last_log_seq = -1

    def ingest(self, report: Report, log_seq: int, *, guard: bool = True) -> Version | None:
        """Feed one validated report (at log position `log_seq`); return a new version if one is due.

        With `guard` (every live report), a report whose update would leave the strategy's state,
        weights or parameters non-finite is refused with SignalError and changes nothing: it never
        reaches the log, so a replay sees the same reports. Replaying a log needs no guard (what
        was accepted passed it), and a log written before the guard existed replays as it ran."""
        if log_seq <= self.last_log_seq:
            raise ValueError(f"log order violated: seq {log_seq} after {self.last_log_seq}")
        if guard and not 0 <= report.step < MAX_STEP:  # validate_report's bound; steps + delay must stay in int64
            raise SignalError("step", f"must be an integer in [0, 2^53), got {report.step!r}")
        if report.step < self.next_update_step:
            self.last_log_seq = log_seq
            self.max_step = max(self.max_step, report.step)
            self.pending.append(report)
            return None
        window = Window([*self.pending, report], self.spec.num_domains)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # the guard below judges the outcome
            state, decision = self.strategy.update(self.state, window)
        nans = None  # the new state's NaN count, when the guard counted it
        if guard:
            before = self._state_nans if self._state_nans is not None else _nonfinite(self.state)[1]
            nans = _guard(before, state, decision)
            if nans is None:
                carried = [n for n in (*PER_DOMAIN_FIELDS, *PER_SAMPLE_FIELDS) if getattr(report, n) is not None]
                raise SignalError(
                    "/".join(carried) or "report",
                    f"these values would make the {self.spec.strategy.name!r} strategy's state non-finite; "
                    "the report is refused (check the values, or the strategy's params)",
                )
        self.last_log_seq = log_seq
        self.max_step = max(self.max_step, report.step)
        self.pending = []
        self.next_update_step = report.step + self.spec.cadence.update_every
        self.state = state
        self._state_nans = nans
        cur = self.current
        c = self.spec.cadence
        if decision is not None:
            target = shape_weights(decision.weights, self.prior, c)
            params, blob = {**decision.params, **self.weighting}, decision.blob
        elif self.target is not None:  # no new decision: keep moving toward the last one
            target = self.target
            params, blob = {k: v for k, v in cur.params.items() if k != "starving"}, cur.blob
        else:
            return None
        weights = bound_step(cur.weights, target, c.max_step_l1)
        self.target = None if np.array_equal(weights, target) else target
        self.current = Version(
            version=cur.version + 1,
            effective_step=max(report.step + c.delay, cur.effective_step),
            weights=weights,
            params={**params, **self._starvation(weights)},
            blob=blob,
            trigger_step=report.step,
            log_seq=log_seq,
        )
        return self.current

    def _starvation(self, weights: np.ndarray) -> dict[str, Any]:
        """Count one more version for the domains at the floor (and restart the others); the
        `starving` entry of the version's params: indices at the floor for at least
        `cadence.starvation_versions` consecutive versions. Nothing while the detector is off."""
        if self.floor_run is None:
            return {}
        c = self.spec.cadence
        self.floor_run = np.where(at_floor(weights, c.min_weight), self.floor_run + 1, 0)
        return {"starving": [int(i) for i in np.flatnonzero(self.floor_run >= c.starvation_versions)]}

    def snapshot(self) -> bytes:
        """The whole engine state, exact; restore() continues as if never stopped."""
        cur = self.current
        guardrails = {}
        if self.target is not None:
            guardrails["target"] = self.target
        if self.floor_run is not None:
            guardrails["floor_run"] = self.floor_run
        return encode_state(
            {
                **guardrails,  # only where the spec sets them: other snapshots stay as they were
                "strategy": self.strategy.name,
                "fingerprint": self.spec.fingerprint(),
                "state": self.state,
                "version": [cur.version, cur.effective_step, cur.weights, cur.params, cur.trigger_step, cur.log_seq],
                "blob": cur.blob.hex(),
                "next_update_step": self.next_update_step,
                "max_step": self.max_step,
                "last_log_seq": self.last_log_seq,
                "pending": [_report_state(r) for r in self.pending],
            }
        )

    @classmethod
    def restore(cls, spec: JobSpec, data: bytes) -> Engine:
        snap = decode_state(data)
        if snap["fingerprint"] != spec.fingerprint():
            raise ValueError("snapshot belongs to a different job spec (fingerprint mismatch)")
        eng = cls(spec)
        eng.state = snap["state"]
        eng._state_nans = None
        v, eff, w, params, trig, seq = snap["version"]
        eng.current = Version(v, eff, w, params, bytes.fromhex(snap["blob"]), trig, seq)
        eng.next_update_step = snap["next_update_step"]
        eng.max_step = snap["max_step"]
        eng.last_log_seq = snap["last_log_seq"]
        eng.pending = [Report(**r) for r in snap["pending"]]
        eng.target = snap.get("target")
        if eng.floor_run is not None:
            eng.floor_run = np.asarray(snap["floor_run"], dtype=np.int64)
        return eng


def _nonfinite(value: Any) -> tuple[int, int]:
    """(infinities, NaNs) among the floats of a state, array or JSON-able parameter tree."""
    inf = nan = 0
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, np.ndarray):
            if v.dtype.kind in "fc" and not np.isfinite(v).all():  # one pass for the common, finite case
                inf += int(np.isinf(v).sum())
                nan += int(np.isnan(v).sum())
        elif isinstance(v, (float, np.floating)):
            if not math.isfinite(v):  # the math module: a tenth of numpy's cost on a scalar
                if math.isinf(v):
                    inf += 1
                else:
                    nan += 1
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
    return inf, nan


def _guard(nans_before: int, new: Any, decision: Any) -> int | None:
    """The new state's NaN count, or None if the update left the state non-finite: an infinity
    anywhere, or a NaN more than before (some strategies mark "not seen yet" with NaN, and fill
    those in as they learn), or weights that are not all finite, or an infinite parameter."""
    inf, nan = _nonfinite(new)
    if inf or nan > nans_before:
        return None
    if decision is not None and (
        not np.isfinite(np.asarray(decision.weights, dtype=np.float64)).all() or _nonfinite(decision.params)[0] > 0
    ):
        return None
    return nan


def _report_state(r: Report) -> dict[str, Any]:
    return {name: getattr(r, name) for name in Report.__slots__}


def derive_versions(spec: JobSpec, reports: Iterable[tuple[int, Report]]) -> list[Version]:
    """Replay a log from scratch: every version the engine emits, the initial one first."""
    engine = Engine(spec)
    out = [engine.current]
    for log_seq, report in reports:
        v = engine.ingest(report, log_seq)
        if v is not None:
            out.append(v)
    return out
