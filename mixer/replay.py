"""Offline replay: re-derive a job's versions from its log, or derive counterfactual ones.

Reads the database directly. Replaying a run with its own strategy from the start must
reproduce every stored version bit for bit; `verify` reports the first one that does not.
A counterfactual replays the same log through another strategy or other hyperparameters and
can be stored as a derived job (`source_job` set) that the service serves like any other.

Counterfactuals are open loop: the recorded signals were measured on batches drawn under the
original mixture, so a counterfactual says what another strategy would have decided given those
signals, not what it would have done in a run it steered itself.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tqdm import tqdm

from mixer.engine import Engine
from mixer.signals import Report
from mixer.spec import JobSpec, SpecError
from mixer.store import Append, JobRecord, Store, redact
from mixer.transfer import TransferError, resolve_agent
from mixer.types import Version
from mixer.wire import decode_stored

OPEN_LOOP_NOTE = (
    "open loop: the signals were measured on batches drawn under the original job's mixture; "
    "these versions are what the new strategy decides given those signals, not what it would "
    "have done in a run it steered"
)
SPEC_KEYS = ("strategy", "weighting", "cadence", "seed", "unit")
"""Top-level spec fields `--set` may change; any other bare key is a strategy parameter."""


class ReplayError(Exception):
    """A replay cannot run; the message says what is missing or wrong."""


@dataclass(slots=True)
class VerifyResult:
    job: str
    versions_checked: int
    reports: int
    ok: bool
    first_divergence: dict | None = None
    missing: list[int] = field(default_factory=list)
    log_job: str = ""

    def to_dict(self) -> dict:
        return {
            "job": self.job,
            "log_job": self.log_job or self.job,
            "ok": self.ok,
            "versions_checked": self.versions_checked,
            "reports": self.reports,
            "first_divergence": self.first_divergence,
        }


def get_job(store: Store, name: str) -> JobRecord:
    """A job record by name, or a ReplayError naming the database."""
    rec = store.get_job(name)
    if rec is None:
        names = ", ".join(j.name for j in store.list_jobs()[:20]) or "none"
        raise ReplayError(f"job {name!r} not found in {redact(store.url)} (jobs there: {names})")
    return rec


def log_owner(store: Store, rec: JobRecord, *, strict: bool = True) -> JobRecord:
    """The job whose log `rec` consumes: itself, or for a derived job without a log, its source (recursively).

    A source that is not in the database (or a cycle of sources) raises ReplayError; with
    `strict=False` the last job found is the answer (its log is empty: a chart shows nothing)."""
    seen, cur = {rec.name}, rec
    while cur.source_job and store.log_stats(cur.id)[0] == 0:
        src = None if cur.source_job in seen else store.get_job(cur.source_job)
        if src is None:
            if not strict:
                return cur
            raise ReplayError(
                f"job {rec.name!r} has no log in {redact(store.url)}: it derives from {cur.source_job!r}, whose log is not "
                "there (an imported trajectory carries versions only; replay in the database it was exported from)"
            )
        seen.add(src.name)
        cur = src
    return cur


def job_log(store: Store, name: str) -> tuple[JobSpec, int, Iterator[tuple[int, Report]]]:
    """A job's spec, id and the log it consumes, in order, as (log_seq, report)."""
    rec = get_job(store, name)
    spec = JobSpec.from_json(rec.spec_json)
    owner = log_owner(store, rec)
    return spec, rec.id, iter_log(store, owner.id, spec.num_domains)


decode = decode_stored  # a stored report, as the engine saw it (mixer.wire)


def iter_log(store: Store, job_id: int, num_domains: int) -> Iterator[tuple[int, Report]]:
    """Decode and validate a stored log in order."""
    for s in store.signals(job_id):
        yield s.seq, decode(s.payload, num_domains)


def load_log(
    store: Store, name: str, *, progress: bool = False
) -> tuple[JobRecord, JobSpec, list[tuple[int, Report]]]:
    """A job's record, spec and whole log in memory (for replays that run it many times)."""
    rec = get_job(store, name)
    spec = JobSpec.from_json(rec.spec_json)
    owner = log_owner(store, rec)
    total = store.log_stats(owner.id)[0]
    it = iter_log(store, owner.id, spec.num_domains)
    log = list(
        tqdm(
            it,
            total=total,
            desc=f"reading log of {owner.name}",
            unit="report",
            disable=not progress,
            leave=False,
            delay=1.0,
        )
    )
    return rec, spec, log


def _bar(log: Iterable[tuple[int, Report]], total: int | None, desc: str, progress: bool):
    """A log with a progress bar over its reports (shown after a second, gone when done)."""
    return tqdm(log, total=total, desc=desc, unit="report", disable=not progress, leave=False, delay=1.0)


def verify(store: Store, name: str, *, progress: bool = False) -> VerifyResult:
    """Replay `name` from scratch with its own strategy and compare every stored version."""
    rec = get_job(store, name)
    spec = JobSpec.from_json(rec.spec_json)
    owner = log_owner(store, rec)
    total = store.log_stats(owner.id)[0]
    log = iter_log(store, owner.id, spec.num_domains)
    stored = iter(store.versions(rec.id))
    engine = Engine(spec)
    n_reports, checked = 0, 0

    def compare(derived: Version) -> dict | None:
        nonlocal checked
        try:
            want, _ = next(stored)
        except StopIteration:
            return {
                "version": derived.version,
                "step": derived.effective_step,
                "reason": "derived a version that is not stored",
            }
        checked += 1
        if derived.same_as(want):
            return None
        diff = (
            float(np.max(np.abs(derived.weights - want.weights)))
            if derived.weights.shape == want.weights.shape
            else float("inf")
        )
        return {
            "version": want.version,
            "step": want.effective_step,
            "trigger_step": want.trigger_step,
            "max_abs_weight_diff": diff,
            "stored": want.weights.tolist(),
            "derived": derived.weights.tolist(),
            "reason": "weights differ" if diff else "metadata differs (effective step, params or blob)",
        }

    bad = compare(engine.current)
    if bad is None:
        for seq, report in _bar(log, total, f"verifying {name}", progress):
            n_reports += 1
            v = engine.ingest(report, seq, guard=False)  # the log holds what was accepted
            if v is not None and (bad := compare(v)) is not None:
                break
    if bad is None:
        extra = next(stored, None)
        if extra is not None:
            bad = {
                "version": extra[0].version,
                "step": extra[0].effective_step,
                "reason": "stored version was not derived from the log",
            }
    return VerifyResult(name, checked, n_reports, bad is None, bad, log_job=owner.name)


# -- counterfactuals ------------------------------------------------------------------------


def parse_set(item: str) -> tuple[str, Any]:
    """`key=value` with the value read as YAML (so 0.5, true, [1, 2] and null keep their types)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ReplayError(f"--set {item!r}: expected key=value, e.g. alpha=0.5 or cadence.update_every=20")
    try:
        return key, yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ReplayError(f"--set {key}: value {raw!r} is not valid YAML ({e})") from None


def spec_path(key: str) -> list[str]:
    """Where a `--set` key lands in the spec: `cadence.x`, `seed`, ... as given; a bare name is a strategy parameter."""
    parts = key.split(".")
    if parts[0] in ("name", "domains", "data_path"):
        raise ReplayError(
            f"--set {key}: {parts[0]} cannot be changed by a replay (it reads the same log); use --as for the name"
        )
    if parts[0] in SPEC_KEYS:
        return parts
    return ["strategy", "params", *parts]


def derive_spec(
    spec: JobSpec,
    *,
    name: str,
    strategy: str | None = None,
    sets: Iterable[tuple[str, Any]] = (),
    base_dir: str | Path = ".",
) -> JobSpec:
    """The source spec with another strategy and overrides; a SpecError names the `--set` that caused it.

    The files a spec names are resolved as when a spec file is loaded (mixer.transfer): the
    `agent` strategy's `path` (relative to `base_dir`) is read, checked against `sha256` and put in
    `model`. A `--set` of `path` or `sha256` names another agent, so the model the source spec
    carries is dropped and the named file read in its place."""
    data = copy.deepcopy(spec.to_dict())
    data["name"] = name
    if strategy is not None and strategy != spec.strategy.name:
        data["strategy"] = {"name": strategy, "params": {}}  # the old strategy's parameters do not apply
    placed: dict[str, str] = {}
    for key, value in sets:
        path = spec_path(key)
        node = data
        for p in path[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[path[-1]] = value
        placed[".".join(path)] = key
    data = _resolve_files(data, placed, base_dir)
    try:
        return JobSpec.from_dict(data)
    except SpecError as e:
        for path, key in placed.items():
            if e.field == path or e.field.startswith(path + ".") or path.startswith(e.field + "."):
                raise ReplayError(f"--set {key}: {e}") from None
        raise ReplayError(f"derived spec {name!r}: {e}") from None


def _resolve_files(data: dict[str, Any], placed: dict[str, str], base_dir: str | Path) -> dict[str, Any]:
    """`data` with the agent file its `--set`s name read into `strategy.params.model`; a file that is
    missing or does not match its sha256 is a ReplayError naming the `--set`."""
    strategy = data.get("strategy")
    params = strategy.get("params") if isinstance(strategy, dict) else None
    renamed = "strategy.params.path" in placed or "strategy.params.sha256" in placed
    if renamed and "strategy.params.model" not in placed and isinstance(params, dict):
        params.pop("model", None)  # the source's agent is not the one the --set names
    try:
        return resolve_agent(data, base_dir)
    except TransferError as e:
        key = placed.get(
            "strategy.params.sha256"
            if str(e).startswith("strategy.params.sha256")
            else "strategy.params.path"
        )
        raise ReplayError(f"--set {key}: {e}" if key else f"derived spec {data.get('name')!r}: {e}") from None


@dataclass(slots=True)
class Replay:
    """What one replay derived: every version (the initial one first) and the engine after the log."""

    spec: JobSpec
    versions: list[Version]
    engine: Engine
    reports: int
    seconds: float

    def snapshot(self) -> tuple[int, int, bytes]:
        return (self.engine.current.version, self.engine.last_log_seq, self.engine.snapshot())


def replay(
    spec: JobSpec, log: Iterable[tuple[int, Report]], *, progress: bool = False, total: int | None = None
) -> Replay:
    """Run a log through a fresh engine for `spec`; deterministic (same spec and log, same bits)."""
    t0 = time.perf_counter()
    engine = Engine(spec)
    versions = [engine.current]
    n = 0
    for seq, report in _bar(log, total, f"replaying {spec.name}", progress):
        n += 1
        v = engine.ingest(report, seq, guard=False)  # the log holds what was accepted
        if v is not None:
            versions.append(v)
    return Replay(spec, versions, engine, n, time.perf_counter() - t0)


def store_derived(
    store: Store, spec: JobSpec, source: str, versions: list[Version], snapshot: tuple[int, int, bytes]
) -> tuple[JobRecord, bool]:
    """Store `versions` as job `spec.name` derived from `source`; (record, newly written).

    Idempotent: the same spec and versions again change nothing; anything else under that name
    is refused. `snapshot` is stored with them so a server that loads the job serves its newest
    version as current.
    """
    rec = store.get_job(spec.name)
    if rec is not None:
        if rec.fingerprint != spec.fingerprint() or rec.source_job != source:
            what = f"derived from {rec.source_job!r}" if rec.source_job else "a recorded job"
            raise ReplayError(
                f"job {spec.name!r} already exists ({what}, strategy {rec.strategy}) with another spec; choose another --as"
            )
        stored = [v for v, _ in store.versions(rec.id)]
        if stored:
            if len(stored) == len(versions) and all(a.same_as(b) for a, b in zip(stored, versions)):
                return rec, False
            raise ReplayError(
                f"job {spec.name!r} exists with this spec but {len(stored)} different stored versions "
                f"(this one has {len(versions)}; has the source log grown?); choose another --as"
            )
    else:
        rec, _ = store.create_job(
            spec.name, spec.to_json(), spec.fingerprint(), spec.strategy.name, source_job=source
        )
    store.append([Append(rec.id, versions=versions, snapshot=snapshot)])
    return rec, True
