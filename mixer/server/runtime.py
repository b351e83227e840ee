"""The registry of live jobs: loaded lazily from the store, owned through leases, reloaded when poisoned.

`Runtimes` is what the RPCs and the HTTP side see: each job's runtime (job.py), the admission of
reports (admission.py) and the mailbox that carries results from other threads to the loop
(mailbox.py, which also says which thread does what).
A failed commit poisons the job's runtime: it is dropped and rebuilt from the database
(snapshot + log) on the next access, once its lane is idle, so memory never runs ahead of what
is durable. GetWeights reads committed versions from `RecentVersions` (the newest ones, loaded
with the job), and the database only for a version older than those.

With several servers on one database (`HaConfig`), each announces itself in a heartbeat row and owns
jobs through lease rows (store/repository.py), both renewed every TTL/3 in one transaction. A job
no live server holds belongs to the first live server in its rendezvous order (repository.py names
the hashing): asked about such a job, or asked to create one, another server sends the client there
instead of taking it, so jobs spread over the servers however the clients connect. A held job
stays where it is; when its owner dies, its heartbeat and its leases run out together and the next
server in the job's order takes it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
from sqlalchemy.exc import SQLAlchemyError

from mixer.engine import Engine
from mixer.server.admission import Admission, Taken
from mixer.server.errors import MAX_MESSAGE, MixerError
from mixer.server.job import VERSIONS_KEPT, JobRuntime, RecentVersions, SourceKeys
from mixer.server.mailbox import Mailbox
from mixer.server.offload import OffloadedStrategy, UpdateProcesses
from mixer.spec import JobSpec, SpecError
from mixer.store import Append, JobRecord, Store
from mixer.store.writer import GroupCommitWriter
from mixer.types import Version
from mixer.v1 import mixer_pb2 as pb
from mixer.wire import decode_stored

__all__ = [
    "MAX_MESSAGE",
    "VERSIONS_KEPT",
    "HaConfig",
    "JobRuntime",
    "Limits",
    "MixerError",
    "Runtimes",
    "Taken",
]

log = logging.getLogger("mixer.server")


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


class Runtimes:
    """All live jobs of one server, loaded lazily from the store."""

    def __init__(
        self,
        store: Store,
        writer: GroupCommitWriter,
        limits: Limits | None = None,
        metrics=None,
        ha: HaConfig | None = None,
    ):
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
        self.mail = Mailbox(self._loop)
        self.admission = Admission(store, writer, self.limits, metrics, self.mail, self.poison)
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
            raise MixerError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"domains: {spec.num_domains} exceeds the limit of {self.limits.max_domains}",
            )
        existing = await asyncio.to_thread(self.store.get_job, spec.name)
        if existing is not None:
            if not spec.same_job(existing.spec_json, existing.fingerprint):
                raise MixerError(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"job {spec.name!r} exists with a different spec (fingerprint {existing.fingerprint})",
                )
            return existing, False
        if self.ha is not None:
            first, address = await asyncio.to_thread(
                self.store.placement, spec.name, self.ha.server_id, self.ha.address
            )
            if first != self.ha.server_id:
                raise MixerError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"job {spec.name!r} belongs on {address}; create it there",
                    owner=address,
                )
        rec, created = await asyncio.to_thread(
            self.store.create_job,
            spec.name,
            spec.to_json(),
            spec.fingerprint(),
            spec.strategy.name,
            source_job,
        )
        if created:
            if self.ha is not None:
                await asyncio.to_thread(
                    self.store.acquire_lease, rec.id, self.ha.server_id, self.ha.address, self.ha.ttl
                )
            engine = Engine(spec)
            await asyncio.wrap_future(
                self.writer.submit(
                    Append(rec.id, versions=[engine.current], snapshot=(0, -1, engine.snapshot()))
                )
            )
        elif not spec.same_job(rec.spec_json, rec.fingerprint):
            raise MixerError(
                grpc.StatusCode.ALREADY_EXISTS, f"job {spec.name!r} exists with a different spec"
            )
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
            ours, owner = self.store.acquire_lease(
                job.id, self.ha.server_id, self.ha.address, self.ha.ttl, place=job.name
            )
            if not ours:
                raise MixerError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"job {name!r} is served by {owner}; connect there",
                    owner=owner,
                )
        spec = JobSpec.from_json(job.spec_json)
        snap = self.store.latest_snapshot(job.id)
        engine = Engine.restore(spec, snap[2]) if snap else Engine(spec)
        engine.strategy = OffloadedStrategy(
            engine.strategy, job.id, spec.fingerprint(), job.spec_json, self._processes
        )
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
            job=job,
            spec=spec,
            engine=engine,
            next_seq=max_seq + 1,
            marks=self.store.source_marks(job.id),
            versions=versions,
            report_count=count,
            recent=recent,
        )
        log.info("loaded job %s: %d reports, version %d", name, count, engine.current.version)
        return rt

    async def keep_leases(self) -> None:
        """Announce this server as live and renew its leases, now and every TTL/3; drop every job
        whose lease another server took."""
        while True:
            live = {rt.job.id: rt for rt in list(self.jobs.values())}
            try:
                lost = await asyncio.to_thread(
                    self.store.heartbeat, self.ha.server_id, self.ha.address, self.ha.ttl, list(live)
                )
            except SQLAlchemyError:
                lost = list(live)  # cannot prove we still own them
            for job_id in lost:
                self.poison(live[job_id])
            await asyncio.sleep(self.ha.ttl / 3)

    async def finish(self, name: str) -> JobRuntime:
        rt = await self.get(name)
        await asyncio.to_thread(self.store.set_job_status, name, "finished")
        rt.job.status = "finished"
        return rt

    def begin_ingest(
        self, rt: JobRuntime, msgs: Sequence[pb.Signals], on_taken: Callable[[Taken], None]
    ) -> None:
        """Admit reports (Admission.begin): `on_taken(taken)` runs on the loop once admission is
        over; the caller sends the refusals then, and the acks once `when_settled` says so."""
        self.admission.begin(rt, msgs, on_taken)

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
        self.admission.when_settled(rt, taken, done)

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

    def poison(self, rt: JobRuntime) -> None:
        """Drop a runtime whose memory may differ from the database; the next access reloads it
        (from any thread: the flag stops its admissions at once, the loop drops it)."""
        if not rt.poisoned:
            rt.poisoned = True
            log.warning("job %s will be reloaded from the database", rt.job.name)
            if self.mail.on_loop():
                self._drop(rt)
            else:
                self.mail.post(self._drop, rt)

    def _drop(self, rt: JobRuntime) -> None:
        if self.jobs.get(rt.job.name) is rt:
            self.jobs.pop(rt.job.name, None)
        if rt.offloaded:
            self._retired[rt.job.name] = rt

    def close(self) -> None:
        """Stop the lanes' threads once their work is done (after the server stopped taking
        reports), then the update processes."""
        self.admission.close()
        self._processes.close()

    # -- reads ----------------------------------------------------------------------------------

    async def version_at(
        self, rt: JobRuntime, *, step: int | None = None, number: int | None = None
    ) -> tuple[Version, float]:
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
