"""Live jobs: each job's engine, log position, per-source marks, recent versions and watchers.

Ingest: validate -> dedup -> assign the log position -> engine -> submit to the group commit; the
acknowledgement waits for the commit, which carries the report and any version it produced. A
batch of reports goes through the same path report by report and is submitted as one append:
one commit future, one acknowledgement message.

Which thread does what (the hand-over is all here):
- The event loop admits reports whose work is cheap: a report inside an update window, a
  duplicate whose key is among its source's recent ones (`SourceKeys`, in memory).
- A report that closes a window (a strategy update: an ADO refit, an Aioli round, DWM training)
  or a duplicate older than its source's recent keys (a database read) is admitted on the job's
  lane: a serial queue run by a small thread pool. From that report on, everything of the job
  goes through its lane, in arrival order, until the lane is empty and its results are back on
  the loop; only then does the loop admit the job's reports again. So the log order is the
  arrival order, one thread at a time touches a job's engine, and replay stays bit-exact.
  While a lane works, the loop reads only values that are replaced whole (the engine's
  `current`, counters). A strategy whose update once took long computes, from then on, in an
  update process (offload.py): a computing thread would hold the interpreter lock the loop needs.
- The writer thread commits; commit outcomes come back to the loop through one mailbox
  (`_post`), as do lane results, in the order they were posted.
A failed commit poisons the job's runtime: it is dropped and rebuilt from the database
(snapshot + log) on the next access, once its lane is idle, so memory never runs ahead of what
is durable. GetWeights reads committed versions from `RecentVersions` (the newest ones, loaded
with the job), and the database only for a version older than those.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import numpy as np
from sqlalchemy.exc import SQLAlchemyError

from mixer.engine import Engine, Version
from mixer.server.offload import Lane, OffloadedStrategy, UpdateProcesses
from mixer.signals import Report, SignalError, validate_report
from mixer.spec import JobSpec, SpecError
from mixer.store import Append, JobRecord, Store
from mixer.store.writer import GroupCommitWriter
from mixer.v1 import mixer_pb2 as pb
from mixer.wire import decode_stored, report_from_proto

log = logging.getLogger("mixer.server")


MAX_MESSAGE = 1024
"""Characters of a status message (a limit on what the server echoes back)."""


class MixerError(Exception):
    """An error with the gRPC status it maps to."""

    def __init__(self, code: grpc.StatusCode, message: str):
        self.code = code
        # A status message must be valid UTF-8 (a lone surrogate from bad input would stall the call),
        # and short: it travels in trailing metadata, whose size is limited (8 KiB by default), so
        # a long name echoed back would turn the answer into a transport error.
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        if len(message) > MAX_MESSAGE:
            message = f"{message[: MAX_MESSAGE - 40]}... ({len(message) - MAX_MESSAGE + 40} characters cut)"
        self.message = message
        super().__init__(self.message)


@dataclass(frozen=True, slots=True)
class HaConfig:
    """High availability: jobs are owned through lease rows; a non-owner sends clients on."""

    server_id: str
    address: str
    """Where clients reach this server (reported to them by the other servers)."""
    ttl: float = 5.0


@dataclass(slots=True)
class Limits:
    max_samples_per_report: int = 1 << 20
    max_domains: int = 100_000
    max_sessions_per_job: int = 1024


LANE_THREADS = 4
"""Threads that run the jobs' lanes (strategy updates, old-duplicate look-ups): as many jobs'
updates at once; a lane holds a thread only while it has work."""
KEYS_KEPT = 4096
"""Per source, the newest log keys kept in memory: a re-sent report among them is answered
without the database (a reconnecting Reporter re-sends at most its buffer, 4096 by default)."""
VERSIONS_KEPT = 256
"""Per job, the newest committed versions kept in memory for GetWeights (by number, at a step)."""
VERSION_BYTES_KEPT = 64 << 20
"""... and at most this many bytes of their weights and blobs (a weighting model's tensors)."""


class SourceKeys:
    """A source's newest log keys in log order (which is (step, seq) order: a source's new report
    must lie above its mark): (step, seq) -> log position, for answering re-sent reports."""

    __slots__ = ("logs", "seqs", "steps")

    def __init__(self) -> None:
        self.steps, self.seqs, self.logs = array("q"), array("q"), array("q")

    def add(self, step: int, seq: int, log_seq: int) -> None:
        self.steps.append(step)
        self.seqs.append(seq)
        self.logs.append(log_seq)
        if len(self.steps) >= 2 * KEYS_KEPT:  # drop the older half: amortised O(1) per key
            del self.steps[:KEYS_KEPT], self.seqs[:KEYS_KEPT], self.logs[:KEYS_KEPT]

    def covers(self, step: int, seq: int) -> bool:
        """Whether every key of this source from (step, seq) on is here (so one missing is not in the log)."""
        return bool(self.steps) and (step, seq) >= (self.steps[0], self.seqs[0])

    def find(self, step: int, seq: int) -> int | None:
        i = bisect.bisect_left(self.steps, step)
        n = len(self.steps)
        while i < n and self.steps[i] == step:
            if self.seqs[i] == seq:
                return self.logs[i]
            i += 1
        return None


class RecentVersions:
    """A job's newest committed versions, oldest first, with their commit times. Effective steps
    never decrease from one version to the next, so the version in force at a step is found by
    bisection; one older than those kept is looked up in the database."""

    __slots__ = ("complete", "created", "nbytes", "steps", "versions")

    def __init__(self, rows: list[tuple[Version, float]]):
        self.versions: deque[Version] = deque()
        self.created: deque[float] = deque()
        self.steps: deque[int] = deque()
        self.nbytes = 0
        self.complete = bool(rows) and rows[0][0].version == 0
        """Whether the first version kept is version 0 (nothing older exists)."""
        for v, created in rows:
            self.add(v, created)

    def add(self, v: Version, created: float) -> None:
        if self.versions and v.version <= self.versions[-1].version:
            return
        self.versions.append(v)
        self.created.append(created)
        self.steps.append(v.effective_step)
        self.nbytes += v.weights.nbytes + len(v.blob)
        while len(self.versions) > 1 and (len(self.versions) > VERSIONS_KEPT or self.nbytes > VERSION_BYTES_KEPT):
            old = self.versions.popleft()
            self.created.popleft()
            self.steps.popleft()
            self.nbytes -= old.weights.nbytes + len(old.blob)
            self.complete = False

    @property
    def newest(self) -> tuple[Version, float] | None:
        return (self.versions[-1], self.created[-1]) if self.versions else None

    def created_at(self, number: int) -> float | None:
        if not self.versions or not self.versions[0].version <= number <= self.versions[-1].version:
            return None
        i = number - self.versions[0].version  # versions are consecutive
        return self.created[i] if 0 <= i < len(self.versions) and self.versions[i].version == number else None

    def find(self, *, number: int | None = None, step: int | None = None) -> tuple[Version, float] | None | bool:
        """The version with this number, or the one in force at `step`; None if there is none,
        False if the answer lies before the versions kept (ask the database)."""
        if not self.versions:
            return False
        first = self.versions[0].version
        if number is not None:
            if number > self.versions[-1].version or number < 0:
                return None
            if number < first:
                return None if self.complete else False
            i = number - first
            return (self.versions[i], self.created[i]) if self.versions[i].version == number else False
        i = bisect.bisect_right(self.steps, step) - 1
        if i < 0:
            return None if self.complete else False
        return self.versions[i], self.created[i]


@dataclass(slots=True)
class Taken:
    """What admission did with a batch of reports."""

    futures: list[Future] = field(default_factory=list)
    """Commits to wait for: this batch's, and those of in-flight reports it repeated."""
    acks: list[pb.Ack] = field(default_factory=list)
    """Reports taken or found to be duplicates, in order; sent once `futures` resolve."""
    refused: list[tuple[pb.Signals, MixerError]] = field(default_factory=list)
    versions: list[Version] = field(default_factory=list)
    """New versions, oldest first; published once `futures` resolve."""


@dataclass(slots=True)
class _Batch:
    """A batch on its way through admission (on the loop, then perhaps on the job's lane)."""

    msgs: Sequence[pb.Signals]
    append: Append
    taken: Taken = field(default_factory=Taken)
    fut: Future = field(default_factory=Future)
    keys: list[tuple[int, str, int]] = field(default_factory=list)
    found: dict[tuple[int, str, int], int] = field(default_factory=dict)
    """Log positions of old duplicates, read from the database in one query (on the lane)."""


_DEFER = object()
"""_admit's answer on the loop for a report that must go through the job's lane."""


@dataclass
class JobRuntime:
    job: JobRecord
    spec: JobSpec
    engine: Engine
    next_seq: int
    marks: dict[str, tuple[int, int]]
    versions: RecentVersions
    report_count: int = 0
    sample_count: int = 0
    duplicate_count: int = 0
    inflight: dict[tuple[int, str, int], tuple[Future, int]] = field(default_factory=dict)
    recent: dict[str, SourceKeys] = field(default_factory=dict)
    """Per source, its newest log keys (re-sent reports among them need no database read)."""
    watchers: set[asyncio.Queue] = field(default_factory=set)
    last_loss: np.ndarray | None = None
    applied_lag: int = 0
    """Steps between a version's effective step and the step a worker first reported applying it."""
    applied_max: int = -1
    """The newest version any worker reported applying."""
    poisoned: bool = False
    sessions: int = 0
    lane: Lane | None = None
    offloaded: int = 0
    """Batches handed to the lane whose results are not back on the loop (touched on the loop only)."""

    def subscribe(self) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(maxsize=1024)
        self.watchers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        self.watchers.discard(q)

    def created_at(self, number: int) -> float:
        """When a version was committed (0.0 if it is not among those kept)."""
        return self.versions.created_at(number) or 0.0

    def note_created(self, v: Version) -> None:
        self.versions.add(v, time.time())

    def publish(self, v: Version) -> None:
        for q in list(self.watchers):
            if q.full():  # a reader that stopped reading loses its oldest push, never blocks ingest
                q.get_nowait()
            q.put_nowait(v)

    def remember(self, source: str, step: int, seq: int, log_seq: int) -> None:
        keys = self.recent.get(source)
        if keys is None:
            keys = self.recent[source] = SourceKeys()
        keys.add(step, seq, log_seq)


class Runtimes:
    """All live jobs of one server, loaded lazily from the store."""

    def __init__(self, store: Store, writer: GroupCommitWriter, limits: Limits | None = None, metrics=None, ha: HaConfig | None = None):
        self.ha = ha
        self.store = store
        self.writer = writer
        self.limits = limits or Limits()
        self.metrics = metrics
        self.jobs: dict[str, JobRuntime] = {}
        self._loading: dict[str, asyncio.Future] = {}
        self._ids: dict[str, int] = {}
        self.stopping = asyncio.Event()
        """Set on SIGTERM: sessions stop reading, settle what they took, and end."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        # Commit outcomes travel from the writer thread to the loop through one mailbox: one
        # loop wake-up per group commit, however many batches it settled.
        self._mail: deque[tuple[Callable, tuple]] = deque()
        self._mail_lock = threading.Lock()
        self._mail_armed = False
        self._lanes = ThreadPoolExecutor(max_workers=LANE_THREADS, thread_name_prefix="mixer-lane")
        self._processes = UpdateProcesses()
        self._retired: dict[str, JobRuntime] = {}
        """Poisoned runtimes whose lane may still be at work: a reload waits for it."""

    # -- jobs -------------------------------------------------------------------------------

    async def create_job(self, spec_text: str, source_job: str | None = None) -> tuple[JobRecord, bool]:
        try:
            spec = JobSpec.from_yaml(spec_text)
        except SpecError as e:
            raise MixerError(grpc.StatusCode.INVALID_ARGUMENT, f"invalid job spec: {e}") from None
        if spec.num_domains > self.limits.max_domains:
            raise MixerError(grpc.StatusCode.INVALID_ARGUMENT, f"domains: {spec.num_domains} exceeds the limit of {self.limits.max_domains}")
        existing = await asyncio.to_thread(self.store.get_job, spec.name)
        if existing is not None:
            if existing.fingerprint != spec.fingerprint():
                raise MixerError(grpc.StatusCode.ALREADY_EXISTS, f"job {spec.name!r} exists with a different spec (fingerprint {existing.fingerprint})")
            return existing, False
        rec, created = await asyncio.to_thread(self.store.create_job, spec.name, spec.to_json(), spec.fingerprint(), spec.strategy.name, source_job)
        if created:
            if self.ha is not None:
                await asyncio.to_thread(self.store.acquire_lease, rec.id, self.ha.server_id, self.ha.address, self.ha.ttl)
            engine = Engine(spec)
            await asyncio.wrap_future(self.writer.submit(Append(rec.id, versions=[engine.current], snapshot=(0, -1, engine.snapshot()))))
        elif rec.fingerprint != spec.fingerprint():
            raise MixerError(grpc.StatusCode.ALREADY_EXISTS, f"job {spec.name!r} exists with a different spec")
        return rec, created

    async def get(self, name: str) -> JobRuntime:
        rt = self.jobs.get(name)
        if rt is not None and not rt.poisoned:
            return rt
        if name in self._loading:
            return await asyncio.shield(self._loading[name])
        fut = asyncio.get_running_loop().create_future()
        self._loading[name] = fut
        try:
            # Anything an old, poisoned runtime queued must be settled before the log is read:
            # what its lane is admitting (it stops at the next report), then the commits.
            old = self._retired.pop(name, None) or rt
            while old is not None and old.offloaded:
                await asyncio.sleep(0.005)
            await asyncio.wrap_future(self.writer.barrier(self._ids.get(name)))
            rt = await asyncio.to_thread(self._load, name)
            self.jobs[name] = rt
            self._ids[name] = rt.job.id
            fut.set_result(rt)
            return rt
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # mark retrieved: other waiters get it through shield
            raise
        finally:
            del self._loading[name]

    def _load(self, name: str) -> JobRuntime:
        job = self.store.get_job(name)
        if job is None:
            raise MixerError(grpc.StatusCode.NOT_FOUND, f"job {name!r} not found")
        if self.ha is not None:
            ours, owner = self.store.acquire_lease(job.id, self.ha.server_id, self.ha.address, self.ha.ttl)
            if not ours:
                raise MixerError(grpc.StatusCode.UNAVAILABLE, f"job {name!r} is served by {owner}; connect there")
        spec = JobSpec.from_json(job.spec_json)
        snap = self.store.latest_snapshot(job.id)
        engine = Engine.restore(spec, snap[2]) if snap else Engine(spec)
        engine.strategy = OffloadedStrategy(engine.strategy, job.id, spec.fingerprint(), job.spec_json, self._processes)
        recent: dict[str, SourceKeys] = {}
        for rec in self.store.signals(job.id, after_seq=engine.last_log_seq):
            engine.ingest(decode_stored(rec.payload, spec.num_domains), rec.seq, guard=False)
            keys = recent.get(rec.source)
            if keys is None:
                keys = recent[rec.source] = SourceKeys()
            keys.add(rec.step, rec.source_seq, rec.seq)
        count, max_seq, _ = self.store.log_stats(job.id)
        versions = RecentVersions(self.store.versions(job.id, after=engine.current.version - VERSIONS_KEPT))
        rt = JobRuntime(
            job=job, spec=spec, engine=engine, next_seq=max_seq + 1, marks=self.store.source_marks(job.id), versions=versions, report_count=count, recent=recent
        )
        log.info("loaded job %s: %d reports, version %d", name, count, engine.current.version)
        return rt

    async def keep_leases(self) -> None:
        """Renew this server's leases; drop every job whose lease another server took."""
        while True:
            await asyncio.sleep(self.ha.ttl / 3)
            live = {rt.job.id: rt for rt in list(self.jobs.values())}
            if not live:
                continue
            try:
                lost = await asyncio.to_thread(self.store.renew_leases, list(live), self.ha.server_id, self.ha.ttl)
            except SQLAlchemyError:
                lost = list(live)  # cannot prove we still own them
            for job_id in lost:
                self.poison(live[job_id])

    async def finish(self, name: str) -> JobRuntime:
        rt = await self.get(name)
        await asyncio.to_thread(self.store.set_job_status, name, "finished")
        rt.job.status = "finished"
        return rt

    # -- ingest -------------------------------------------------------------------------------

    def begin_ingest(self, rt: JobRuntime, msgs: Sequence[pb.Signals], on_taken: Callable[[Taken], None]) -> None:
        """Admit reports, in order: each is taken, recognized as a duplicate or refused on its own;
        everything taken goes to the group commit as one append. `on_taken(taken)` runs on the
        loop once admission is over: at once, or once the job's lane is through with the batch.
        The caller sends the refusals then, and the acks once `when_settled` says so."""
        batch = _Batch(msgs, Append(rt.job.id))
        if rt.offloaded:  # the lane has the job's earlier reports: these go after them
            self._offload(rt, batch, 0, on_taken)
            return
        i = self._admit_all(rt, batch, 0, on_loop=True)
        if i < len(msgs):
            self._offload(rt, batch, i, on_taken)
            return
        self._submit(rt, batch)
        on_taken(batch.taken)

    def _admit_all(self, rt: JobRuntime, batch: _Batch, start: int, *, on_loop: bool) -> int:
        """Admit batch.msgs from `start` on; on the loop, stop before a report that needs the
        lane and return its index (len(msgs) when all are admitted)."""
        for i in range(start, len(batch.msgs)):
            msg = batch.msgs[i]
            try:
                if self._admit(rt, msg, batch, on_loop) is _DEFER:
                    return i
            except MixerError as e:
                batch.taken.refused.append((msg, e))
            except Exception:  # a bug must not hang the session; the report is not in the log
                log.exception("ingest failed for job %s", rt.job.name)
                self.poison(rt)  # its engine may be half-updated: rebuild it from the log (later reports: UNAVAILABLE)
                batch.taken.refused.append((msg, MixerError(grpc.StatusCode.INTERNAL, "internal error; see the server log")))
        return len(batch.msgs)

    def _submit(self, rt: JobRuntime, batch: _Batch) -> None:
        """Hand what a batch took to the group commit (from the loop or the lane)."""
        if batch.append.signals:
            fut = batch.fut
            self.writer.submit(batch.append, fut)
            fut.add_done_callback(lambda f, rt=rt, keys=batch.keys: self._settled(rt, keys, f))
            batch.taken.futures.append(fut)

    def _offload(self, rt: JobRuntime, batch: _Batch, start: int, on_taken: Callable[[Taken], None]) -> None:
        """Admit the rest of a batch on the job's lane; its result comes back through the mailbox."""
        if rt.lane is None:
            rt.lane = Lane(self._lanes)
        rt.offloaded += 1

        def back() -> None:  # on the loop, in the order the lane finished its batches
            rt.offloaded -= 1
            on_taken(batch.taken)

        def work() -> None:  # on a lane thread
            try:
                self._prefetch(rt, batch, start)
                self._admit_all(rt, batch, start, on_loop=False)
                self._submit(rt, batch)
            finally:
                self._post(back)

        rt.lane.submit(work)

    def _prefetch(self, rt: JobRuntime, batch: _Batch, start: int) -> None:
        """On the lane: the log positions of the batch's re-sent reports older than their source's
        recent keys, in one query per source (a burst of old re-sends costs a few reads, not one each)."""
        wanted: dict[str, list[tuple[int, int]]] = {}
        for msg in batch.msgs[start:]:
            mark = rt.marks.get(msg.source)
            if mark is None or (msg.step, msg.seq) > mark:
                continue
            keys = rt.recent.get(msg.source)
            if keys is None or not keys.covers(msg.step, msg.seq):
                wanted.setdefault(msg.source, []).append((msg.step, msg.seq))
        for source, keys in wanted.items():
            if len(keys) < 2:
                continue  # one look-up: _admit's own
            try:
                for (step, seq), log_seq in self.store.find_signals(rt.job.id, source, keys).items():
                    batch.found[step, source, seq] = log_seq
            except SQLAlchemyError:
                return  # _admit reads them one by one and reports the failure

    def _admit(self, rt: JobRuntime, msg: pb.Signals, batch: _Batch, on_loop: bool):
        """One report: refuse it (MixerError), ack it as a duplicate, or take it into the batch's
        append; on the loop, _DEFER a report that needs the lane (nothing is changed then)."""
        taken = batch.taken
        fut = batch.fut
        if rt.job.source_job:
            self._reject("derived")
            raise MixerError(grpc.StatusCode.FAILED_PRECONDITION, f"job {rt.job.name!r} is derived from {rt.job.source_job!r} (a replay); it takes no reports")
        if rt.job.status == "finished":
            self._reject("finished")
            raise MixerError(grpc.StatusCode.FAILED_PRECONDITION, f"job {rt.job.name!r} is finished; it takes no more reports")
        if rt.poisoned:
            raise MixerError(grpc.StatusCode.UNAVAILABLE, f"job {rt.job.name!r} is reloading after a database failure; reconnect and resend")
        try:
            report = validate_report(report_from_proto(msg), rt.spec.num_domains, max_samples=self.limits.max_samples_per_report)
        except SignalError as e:
            self._reject("invalid")
            raise MixerError(grpc.StatusCode.INVALID_ARGUMENT, f"report rejected: {e}") from None
        key = report.key
        eng = rt.engine
        lag = rt.spec.cadence.max_step_lag
        if eng.max_step >= 0 and report.step < eng.max_step - lag:
            self._reject("stale")
            raise MixerError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"report rejected: step: {report.step} is more than cadence.max_step_lag={lag} steps behind the newest step {eng.max_step}",
            )
        ahead = rt.spec.cadence.step_ahead
        newest = max(eng.max_step, 0)
        if report.step > newest + ahead:
            # Far ahead would move the job's clock: honest reports would then be too far behind
            # and new versions would take effect at a step no worker reaches.
            self._reject("ahead")
            raise MixerError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"report rejected: step: {report.step} is more than cadence.max_step_ahead={ahead} steps ahead of the newest step {newest}",
            )
        mark = rt.marks.get(report.source)
        if mark is not None and (report.step, report.seq) <= mark:
            # A duplicate: acknowledged (once the original is durable) with the original's place.
            if key in rt.inflight:
                other, seq = rt.inflight[key]
                if other is not fut and other not in taken.futures:
                    taken.futures.append(other)
            else:
                keys = rt.recent.get(report.source)
                if keys is not None and keys.covers(report.step, report.seq):
                    seq = keys.find(report.step, report.seq)
                    where = "memory"
                elif on_loop:
                    return _DEFER  # the database knows: read it on the lane, never on the loop
                elif key in batch.found:
                    seq, where = batch.found[key], "database"
                else:
                    try:
                        seq = self.store.has_signal(rt.job.id, *key)
                    except SQLAlchemyError:
                        raise MixerError(grpc.StatusCode.UNAVAILABLE, "the database is unavailable; retry later") from None
                    where = "database"
                if self.metrics is not None:
                    self.metrics.duplicate_lookup(where)
                if seq is None:
                    self._reject("out_of_order")
                    raise MixerError(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"report rejected: source {report.source!r} already reported step {mark[0]} seq {mark[1]}; "
                        f"step {report.step} seq {report.seq} is out of order and not in the log",
                    )
            rt.duplicate_count += 1
            taken.acks.append(pb.Ack(step=report.step, seq=report.seq, duplicate=True, log_seq=seq, source=report.source))
            return None
        if on_loop and report.step >= eng.next_update_step:
            return _DEFER  # it closes a window: the strategy update runs on the lane
        seq = rt.next_seq
        t0 = time.perf_counter()
        try:
            version = eng.ingest(report, seq)  # refuses (and changes nothing) if its state would turn non-finite
        except SignalError as e:
            self._reject("invalid")
            raise MixerError(grpc.StatusCode.INVALID_ARGUMENT, f"report rejected: {e}") from None
        if self.metrics is not None and version is not None:
            self.metrics.observe_update(rt.spec.strategy.name, time.perf_counter() - t0)
        rt.next_seq += 1
        rt.marks[report.source] = (report.step, report.seq)
        rt.remember(report.source, report.step, report.seq, seq)
        rt.report_count += 1
        rt.sample_count += report.num_samples
        tokens = report.domain_token_count
        if tokens is not None and report.domain_loss_sum is not None:  # the live per-domain loss (page, metrics)
            if rt.last_loss is None:
                rt.last_loss = np.zeros(rt.spec.num_domains)
            np.divide(report.domain_loss_sum, tokens, out=rt.last_loss, where=tokens > 0)
        self._track_applied(rt, report)
        append = batch.append
        append.signals.append({
            "seq": seq,
            "step": report.step,
            "source": report.source,
            "source_seq": report.seq,
            "applied_version": report.applied_version,
            "num_samples": report.num_samples,
            "payload": msg.SerializeToString(),
        })
        if version is not None:
            append.versions.append(version)
            taken.versions.append(version)
            if version.version % rt.spec.cadence.snapshot_every == 0:
                append.snapshot = (version.version, seq, eng.snapshot())  # a batch keeps its newest
        rt.inflight[key] = (fut, seq)
        batch.keys.append(key)
        taken.acks.append(pb.Ack(step=report.step, seq=report.seq, duplicate=False, log_seq=seq, source=report.source))
        return None

    async def ingest(self, rt: JobRuntime, msg: pb.Signals) -> tuple[pb.Ack, Version | None]:
        """One report, acknowledged once durable (the unary Report call); refusal raises MixerError."""
        admitted = self._loop.create_future()
        self.begin_ingest(rt, [msg], lambda taken: admitted.done() or admitted.set_result(taken))
        taken = await admitted
        if taken.refused:
            raise taken.refused[0][1]
        await self.settle(rt, taken)
        return taken.acks[0], (taken.versions[-1] if taken.versions else None)

    def when_settled(self, rt: JobRuntime, taken: Taken, done: Callable[[MixerError | None], None]) -> None:
        """Call `done(None)` on the loop once a batch's reports are durable (its versions pushed to
        watchers first), or `done(error)` if a commit failed (the client keeps its reports)."""

        def finish(err: BaseException | None) -> None:
            # The futures hold this closure (through their callbacks) and `taken` holds them: break
            # the cycle so the batch is freed by reference counting, not by the cyclic collector
            # (whose full collections over a busy heap stall the loop).
            taken.futures.clear()
            if err is not None:
                done(MixerError(grpc.StatusCode.UNAVAILABLE, f"the database did not commit the report ({type(err).__name__}); retry later"))
                return
            for version in taken.versions:
                rt.note_created(version)
                rt.publish(version)
            done(None)

        futures = taken.futures
        if not futures:
            finish(None)
            return
        state = [len(futures), None]  # commits outstanding, the first error

        def one(f: Future) -> None:
            state[1] = state[1] or f.exception()
            state[0] -= 1
            if state[0] == 0:
                finish(state[1])

        for f in futures:
            f.add_done_callback(lambda f: self._post(one, f))

    async def settle(self, rt: JobRuntime, taken: Taken) -> None:
        """Wait until a batch's reports are durable, then push its versions (if any) to watchers."""
        fut = self._loop.create_future()

        def done(err: MixerError | None) -> None:
            if fut.done():  # the caller went away
                return
            if err is not None:
                fut.set_exception(err)
            else:
                fut.set_result(None)

        self.when_settled(rt, taken, done)
        await fut

    def _post(self, fn: Callable, *args) -> None:
        """From any thread: run fn(*args) on the loop, after everything posted before it (a
        wake-up is scheduled only if none is pending)."""
        with self._mail_lock:
            self._mail.append((fn, args))
            if self._mail_armed:
                return
            self._mail_armed = True
        self._loop.call_soon_threadsafe(self._drain_mail)

    def _drain_mail(self) -> None:
        with self._mail_lock:
            items = list(self._mail)
            self._mail.clear()
            self._mail_armed = False
        for fn, args in items:
            try:
                fn(*args)
            except Exception:  # one session's failure must not stop the others' acks
                log.exception("settling a batch failed")

    def poison(self, rt: JobRuntime) -> None:
        """Drop a runtime whose memory may differ from the database; the next access reloads it
        (from any thread: the flag stops its admissions at once, the loop drops it)."""
        if not rt.poisoned:
            rt.poisoned = True
            log.warning("job %s will be reloaded from the database", rt.job.name)
            if threading.get_ident() == self._loop_thread:
                self._drop(rt)
            else:
                self._post(self._drop, rt)

    def _drop(self, rt: JobRuntime) -> None:
        if self.jobs.get(rt.job.name) is rt:
            self.jobs.pop(rt.job.name, None)
        if rt.offloaded:
            self._retired[rt.job.name] = rt

    def close(self) -> None:
        """Stop the lanes' threads once their work is done (after the server stopped taking
        reports), then the update processes."""
        self._lanes.shutdown(wait=True)
        self._processes.close()

    def _settled(self, rt: JobRuntime, keys: list, fut: Future) -> None:
        # Runs on the writer thread: only plain dict/flag updates here.
        for key in keys:
            rt.inflight.pop(key, None)
        if fut.exception() is not None:
            self.poison(rt)

    def _track_applied(self, rt: JobRuntime, report: Report) -> None:
        v = report.applied_version
        if v <= rt.applied_max:  # versions only grow: the first report applying v is the one to time
            return
        rt.applied_max = v
        if v == rt.engine.current.version:
            rt.applied_lag = max(0, report.step - rt.engine.current.effective_step)

    def _reject(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.rejected(reason)

    # -- reads ----------------------------------------------------------------------------------

    async def version_at(self, rt: JobRuntime, *, step: int | None = None, number: int | None = None) -> tuple[Version, float]:
        """The newest committed version, the one numbered `number`, or the one in force at
        `step`: from memory, or from the database for one older than the versions kept."""
        if step is None and number is None:
            found = rt.versions.newest
        else:
            found = rt.versions.find(number=number, step=step)
            if found is False:
                found = await asyncio.to_thread(self.store.version, rt.job.id, number=number, step=step)
        if found is None:
            what = f"version {number}" if number is not None else f"step {step}"
            raise MixerError(grpc.StatusCode.NOT_FOUND, f"job {rt.job.name!r} has no version for {what}")
        return found


def job_to_proto(rt_or_rec, store_stats: tuple[int, int] | None = None) -> pb.Job:
    if isinstance(rt_or_rec, JobRuntime):
        rt = rt_or_rec
        rec, spec = rt.job, rt.spec
        latest, max_step, count = rt.engine.current.version, rt.engine.max_step, rt.report_count
    else:
        rec = rt_or_rec
        spec = JobSpec.from_json(rec.spec_json)
        latest, max_step, count = -1, -1, 0
    return pb.Job(
        name=rec.name,
        spec_json=rec.spec_json,
        fingerprint=rec.fingerprint,
        domains=spec.domain_names,
        strategy=spec.strategy.name,
        latest_version=latest,
        max_step=max_step,
        report_count=count,
        created_at=rec.created_at,
        source_job=rec.source_job or "",
        weighting=spec.weighting.name,
        status=rec.status,
    )


