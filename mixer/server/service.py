"""The gRPC servicer: mixer.v1.MixerService over the live runtimes."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time

import grpc
from sqlalchemy.exc import SQLAlchemyError

from mixer.server.auth import ALL_JOBS, Authenticator
from mixer.server.runtime import MixerError, Runtimes, job_to_proto
from mixer.spec import JobSpec, SpecError
from mixer.v1 import mixer_pb2 as pb
from mixer.v1 import mixer_pb2_grpc as pb_grpc
from mixer.wire import version_to_proto

log = logging.getLogger("mixer.server")

_STOPPING = object()  # a session's output queue: the server is shutting down


def db_unavailable(e: SQLAlchemyError) -> MixerError:
    """The database failed: the caller should keep its data and retry."""
    log.warning("database error: %s", e.__class__.__name__)
    return MixerError(grpc.StatusCode.UNAVAILABLE, f"the database is unavailable ({e.__class__.__name__}); retry later")


def _unary(method):
    """Map MixerError (and database failures) to a status, and time the call."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        t0 = time.perf_counter()
        try:
            return await method(self, request, context)
        except SQLAlchemyError as e:
            err = db_unavailable(e)
            await context.abort(err.code, err.message)
        except MixerError as e:
            await context.abort(e.code, e.message)
        finally:
            self.metrics.rpc_seconds.labels(method.__name__).observe(time.perf_counter() - t0)

    return wrapper


class MixerService(pb_grpc.MixerServiceServicer):
    def __init__(self, runtimes: Runtimes, metrics, auth: Authenticator):
        self.rts = runtimes
        self.metrics = metrics
        self.auth = auth

    def _version(self, rt, v, created_at: float | None = None) -> pb.WeightVersion:
        return version_to_proto(rt.job.name, v, rt.spec.domain_names, created_at if created_at is not None else rt.created_at.get(v.version, 0.0))

    @staticmethod
    def _need(name: str, what: str = "job") -> None:
        if not name:
            raise MixerError(grpc.StatusCode.INVALID_ARGUMENT, f"{what}: a job name is required")

    @_unary
    async def CreateJob(self, request, context):
        p = await self.auth.check_grpc(context, None, "admin")
        if p is not None and p.job != ALL_JOBS:
            try:
                name = JobSpec.from_yaml(request.spec).name
            except SpecError as e:
                raise MixerError(grpc.StatusCode.INVALID_ARGUMENT, f"invalid job spec: {e}") from None
            if name != p.job:
                raise MixerError(grpc.StatusCode.PERMISSION_DENIED, f"token {p.token_id} is admin of job {p.job!r} only, not {name!r}")
        rec, created = await self.rts.create_job(request.spec)
        rt = await self.rts.get(rec.name)
        return pb.CreateJobResponse(job=job_to_proto(rt), created=created)

    @_unary
    async def GetJob(self, request, context):
        self._need(request.name, "name")
        await self.auth.check_grpc(context, request.name, "reader")
        return pb.GetJobResponse(job=job_to_proto(await self.rts.get(request.name)))

    @_unary
    async def ListJobs(self, request, context):
        p = await self.auth.check_grpc(context, None, "reader")
        recs = await asyncio.to_thread(self.rts.store.list_jobs)
        if p is not None and p.job != ALL_JOBS:
            recs = [r for r in recs if r.name == p.job]
        jobs = []
        for rec in recs:
            rt = self.rts.jobs.get(rec.name)
            jobs.append(job_to_proto(rt if rt is not None else rec))
        return pb.ListJobsResponse(jobs=jobs)

    @_unary
    async def FinishJob(self, request, context):
        self._need(request.name, "name")
        await self.auth.check_grpc(context, request.name, "admin")
        rt = await self.rts.finish(request.name)
        return pb.FinishJobResponse(job=job_to_proto(rt))

    @_unary
    async def Report(self, request, context):
        self._need(request.job)
        await self.auth.check_grpc(context, request.job, "writer")
        t0 = time.perf_counter()
        rt = await self.rts.get(request.job)
        ack, _ = await self.rts.ingest(rt, request.signals)
        self.metrics.ingest_seconds.observe(time.perf_counter() - t0)
        return pb.ReportResponse(ack=ack, latest=self._version(rt, rt.engine.current))

    @_unary
    async def GetWeights(self, request, context):
        self._need(request.job)
        await self.auth.check_grpc(context, request.job, "reader")
        rt = await self.rts.get(request.job)
        which = request.WhichOneof("at")
        if which == "step" and request.step < 0:
            raise MixerError(grpc.StatusCode.INVALID_ARGUMENT, f"step: must be >= 0, got {request.step}")
        v, created = await self.rts.version_at(rt, step=request.step if which == "step" else None, number=request.version if which == "version" else None)
        return pb.GetWeightsResponse(version=self._version(rt, v, created))

    @_unary
    async def ListVersions(self, request, context):
        self._need(request.job)
        await self.auth.check_grpc(context, request.job, "reader")
        rt = await self.rts.get(request.job)
        rows = await asyncio.to_thread(self.rts.store.versions, rt.job.id, request.after_version, request.limit)
        return pb.ListVersionsResponse(versions=[self._version(rt, v, c) for v, c in rows])

    async def WatchWeights(self, request, context):
        try:
            self._need(request.job)
            await self.auth.check_grpc(context, request.job, "reader")
            rt = await self.rts.get(request.job)
        except SQLAlchemyError as e:
            err = db_unavailable(e)
            await context.abort(err.code, err.message)
        except MixerError as e:
            await context.abort(e.code, e.message)
        q = rt.subscribe()
        try:
            last = request.after_version
            for v, created in await asyncio.to_thread(self.rts.store.versions, rt.job.id, last):
                yield pb.WatchWeightsResponse(version=self._version(rt, v, created))
                last = v.version
            while True:
                v = await q.get()
                if v.version > last:
                    last = v.version
                    yield pb.WatchWeightsResponse(version=self._version(rt, v))
        finally:
            rt.unsubscribe(q)

    async def Session(self, request_iterator, context):
        try:
            # One iterator for the whole stream: a second aiter() may drop a message the first read ahead.
            requests = aiter(request_iterator)
            first = await anext(requests)
        except StopAsyncIteration:
            return
        if first.WhichOneof("kind") != "hello":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "session: the first message must be hello")
        hello = first.hello
        try:
            self._need(hello.job, "hello.job")
            if not hello.source:
                raise MixerError(grpc.StatusCode.INVALID_ARGUMENT, "hello.source: a source name is required")
            await self.auth.check_grpc(context, hello.job, "writer")
            rt = await self.rts.get(hello.job)
        except SQLAlchemyError as e:
            err = db_unavailable(e)
            await context.abort(err.code, err.message)
        except MixerError as e:
            await context.abort(e.code, e.message)
        if rt.sessions >= self.rts.limits.max_sessions_per_job:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"job {rt.job.name!r} has {rt.sessions} sessions, the limit (--max-sessions-per-job)")
        rt.sessions += 1
        try:
            async for item in self._session(rt, hello, requests):
                yield item
        finally:
            rt.sessions -= 1

    async def _session(self, rt, hello, request_iterator):
        last = rt.marks.get(hello.source, (-1, -1))
        out: asyncio.Queue = asyncio.Queue()
        q = rt.subscribe()
        yield pb.SessionResponse(
            welcome=pb.Welcome(
                job=rt.job.name,
                source=hello.source,
                last_step=last[0],
                last_seq=last[1],
                current=self._version(rt, rt.engine.current),
                domains=rt.spec.domain_names,
                spec_json=rt.spec.to_json(),
            )
        )
        unsettled = 0  # batches taken whose commit has not resolved yet
        all_settled = asyncio.Event()
        all_settled.set()

        def nack(step: int, seq: int, e: MixerError) -> pb.SessionResponse:
            return pb.SessionResponse(nack=pb.Nack(step=step, seq=seq, code=e.code.value[0], message=e.message))

        def settled(taken, batched: bool, t0: float):
            def done(err: MixerError | None) -> None:  # on the loop, once the batch's commit resolved
                nonlocal unsettled
                if err is not None:
                    for ack in taken.acks:
                        out.put_nowait(nack(ack.step, ack.seq, err))
                else:
                    self.metrics.ingest_seconds.observe(time.perf_counter() - t0)
                    if batched:
                        # New weights (published just now, if this batch triggered an update)
                        # ride with the acknowledgement rather than in a message of their own.
                        v = newest()
                        latest = self._version(rt, v) if v is not None else None
                        out.put_nowait(pb.SessionResponse(acks=pb.AckBatch(acks=taken.acks, latest=latest)))
                    else:
                        for ack in taken.acks:
                            out.put_nowait(pb.SessionResponse(ack=ack))
                unsettled -= 1
                if not unsettled:
                    all_settled.set()

            return done

        async def read():
            nonlocal unsettled
            async for req in request_iterator:
                if self.rts.stopping.is_set():  # shutting down: take nothing more
                    break
                kind = req.WhichOneof("kind")
                if kind == "report":
                    msgs, batched = [req.report], False
                elif kind == "reports":
                    msgs, batched = req.reports.reports, True
                else:
                    continue
                t0 = time.perf_counter()
                taken = self.rts.begin_ingest(rt, msgs)
                for msg, e in taken.refused:
                    out.put_nowait(nack(msg.step, msg.seq, e))
                if not taken.acks:
                    continue
                unsettled += 1
                all_settled.clear()
                self.rts.when_settled(rt, taken, settled(taken, batched, t0))
            await all_settled.wait()
            out.put_nowait(None)

        def newest(v=None):
            """The newest version published and not yet sent to this session (or `v`, or None):
            a worker needs only the newest weights, the ones it was not sent are skipped."""
            while not q.empty():
                v = q.get_nowait()
            if v is not None:
                created = rt.created_at.get(v.version)
                if created:
                    self.metrics.push_seconds.observe(max(0.0, time.time() - created))
            return v

        async def push():
            while True:  # versions no acknowledgement took along
                v = newest(await q.get())
                out.put_nowait(pb.SessionResponse(version=self._version(rt, v)))

        async def stop_watch():
            await self.rts.stopping.wait()
            out.put_nowait(_STOPPING)

        reader = asyncio.create_task(read())
        pusher = asyncio.create_task(push())
        stopper = asyncio.create_task(stop_watch())
        try:
            while True:
                item = await out.get()
                if item is _STOPPING:
                    # Shutting down: take no more reports, acknowledge what was taken, end the stream.
                    reader.cancel()
                    await all_settled.wait()
                    while not out.empty():
                        item = out.get_nowait()
                        if item is not None:
                            yield item
                    return
                if item is None:
                    break
                yield item
            await reader
        finally:
            for t in (reader, pusher, stopper):
                t.cancel()
            for t in (reader, pusher, stopper):
                with contextlib.suppress(BaseException):
                    await t
            rt.unsubscribe(q)
