"""The gRPC servicer: mixer.v1.MixerService over the live runtimes."""

from __future__ import annotations

import asyncio
import functools
import logging
import time

import grpc
from sqlalchemy.exc import SQLAlchemyError

from mixer.server.auth import ALL_JOBS, Authenticator
from mixer.server.config import HELLO_TIMEOUT_S, MAX_PENDING_SESSIONS
from mixer.server.errors import MixerError
from mixer.server.job import JobRuntime, StoredJob
from mixer.server.runtime import Runtimes
from mixer.server.session import STOPPING, SessionStream
from mixer.spec import JobSpec, SpecError
from mixer.v1 import mixer_pb2 as pb
from mixer.v1 import mixer_pb2_grpc as pb_grpc
from mixer.wire import (
    WATCH_BATCH_MAX,
    ReceivedReports,
    Undecodable,
    parse_session_request,
    version_to_proto,
    watch_messages,
)

log = logging.getLogger("mixer.server")

WATCH_HISTORY_PAGE = 1024
"""Versions a watcher's history is read in, a page per database read."""


def _lenient(parse, type_name: str):
    """A request deserializer that never raises: gRPC would answer its exception with UNKNOWN."""

    def deserialize(data: bytes):
        try:
            return parse(data)
        except Exception as e:  # noqa: BLE001 - DecodeError, or whatever a corrupt message raises
            return Undecodable(
                f"request: {len(data)} bytes that are not a {type_name} protobuf message ({type(e).__name__})"
            )

    return deserialize


def _checked(handler: grpc.RpcMethodHandler, type_name: str, parse=None) -> grpc.RpcMethodHandler:
    """The generated handler with bytes that do not parse answered INVALID_ARGUMENT.

    A streaming request (Session) checks each message itself: there is no message to refuse
    before the stream starts."""
    deserialize = _lenient(parse or handler.request_deserializer, type_name)
    if handler.request_streaming:
        return handler._replace(request_deserializer=deserialize)
    if handler.response_streaming:
        inner_stream = handler.unary_stream

        async def unary_stream(request, context):
            if isinstance(request, Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.error)
            async for item in inner_stream(request, context):
                yield item

        return handler._replace(request_deserializer=deserialize, unary_stream=unary_stream)
    inner = handler.unary_unary

    async def unary_unary(request, context):
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.error)
        return await inner(request, context)

    return handler._replace(request_deserializer=deserialize, unary_unary=unary_unary)


def add_to_server(servicer: MixerService, server: grpc.aio.Server) -> None:
    """add_MixerServiceServicer_to_server, with every request deserializer made lenient (_checked)."""
    captured: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

    class Capture:
        def add_generic_rpc_handlers(self, handlers) -> None:
            pass

        def add_registered_method_handlers(self, name, handlers) -> None:
            captured[name] = handlers

    pb_grpc.add_MixerServiceServicer_to_server(servicer, Capture())
    methods = pb.DESCRIPTOR.services_by_name["MixerService"].methods_by_name
    for service_name, handlers in captured.items():
        checked = {
            # Session keeps the bytes each report arrived as (its log payload): see parse_session_request.
            m: _checked(h, methods[m].input_type.full_name, parse_session_request if m == "Session" else None)
            for m, h in handlers.items()
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service_name, checked),))
        server.add_registered_method_handlers(service_name, checked)


def _job(rt_or_stored: JobRuntime | StoredJob) -> pb.Job:
    """A live job (its runtime) or one not loaded (what the database has of it) as a message."""
    return rt_or_stored.to_proto()


def db_unavailable(e: SQLAlchemyError) -> MixerError:
    """The database failed: the caller should keep its data and retry."""
    log.warning("database error: %s", e.__class__.__name__)
    return MixerError(
        grpc.StatusCode.UNAVAILABLE, f"the database is unavailable ({e.__class__.__name__}); retry later"
    )


async def abort(context, e: SQLAlchemyError | MixerError) -> None:
    """End the call with the status for e (a database failure is UNAVAILABLE: keep the data, retry)."""
    err = db_unavailable(e) if isinstance(e, SQLAlchemyError) else e
    await context.abort(err.code, err.message, trailing_metadata=err.trailing_metadata)


def _unary(method):
    """Map MixerError (and database failures) to a status, and time the call."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        t0 = time.perf_counter()
        try:
            return await method(self, request, context)
        except (SQLAlchemyError, MixerError) as e:
            await abort(context, e)
        finally:
            self.metrics.rpc_seconds.labels(method.__name__).observe(time.perf_counter() - t0)

    return wrapper


def _check_after(after: int) -> None:
    if after < -1:
        raise MixerError(grpc.StatusCode.INVALID_ARGUMENT, f"after_version: must be >= -1 (-1: all), got {after}")


class MixerService(pb_grpc.MixerServiceServicer):
    def __init__(
        self,
        runtimes: Runtimes,
        metrics,
        auth: Authenticator,
        *,
        hello_timeout: float = HELLO_TIMEOUT_S,
        max_pending_sessions: int = MAX_PENDING_SESSIONS,
    ):
        self.rts = runtimes
        self.metrics = metrics
        self.auth = auth
        self.hello_timeout = hello_timeout
        self.max_pending_sessions = max_pending_sessions
        self.pending_sessions = 0
        """Session streams not yet past hello and its token check."""

    def _version(self, rt, v, created_at: float | None = None) -> pb.WeightVersion:
        return version_to_proto(
            rt.job.name,
            v,
            rt.spec.domain_names,
            created_at if created_at is not None else rt.created_at(v.version),
        )

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
                raise MixerError(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"token {p.token_id} is admin of job {p.job!r} only, not {name!r}",
                )
        rec, created = await self.rts.create_job(request.spec)
        rt = await self.rts.get(rec.name)
        return pb.CreateJobResponse(job=_job(rt), created=created)

    @_unary
    async def GetJob(self, request, context):
        self._need(request.name, "name")
        await self.auth.check_grpc(context, request.name, "reader")
        return pb.GetJobResponse(job=_job(await self.rts.get(request.name)))

    @_unary
    async def ListJobs(self, request, context):
        p = await self.auth.check_grpc(context, None, "reader")
        store = self.rts.store

        def listed() -> list[pb.Job]:  # on a thread: a job not loaded is read from the store
            recs = store.list_jobs()
            if p is not None and p.job != ALL_JOBS:
                recs = [r for r in recs if r.name == p.job]
            jobs = []
            for rec in recs:
                rt = self.rts.jobs.get(rec.name)
                jobs.append(_job(rt if rt is not None else StoredJob.read(store, rec)))
            return jobs

        return pb.ListJobsResponse(jobs=await asyncio.to_thread(listed))

    @_unary
    async def FinishJob(self, request, context):
        self._need(request.name, "name")
        await self.auth.check_grpc(context, request.name, "admin")
        rt = await self.rts.finish(request.name)
        return pb.FinishJobResponse(job=_job(rt))

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
        v, created = await self.rts.version_at(
            rt,
            step=request.step if which == "step" else None,
            number=request.version if which == "version" else None,
        )
        return pb.GetWeightsResponse(version=self._version(rt, v, created))

    @_unary
    async def ListVersions(self, request, context):
        self._need(request.job)
        await self.auth.check_grpc(context, request.job, "reader")
        _check_after(request.after_version)
        if request.limit < 0:
            raise MixerError(grpc.StatusCode.INVALID_ARGUMENT, f"limit: must be >= 0 (0: no limit), got {request.limit}")
        rt = await self.rts.get(request.job)
        rows = await asyncio.to_thread(
            self.rts.store.versions, rt.job.id, request.after_version, request.limit
        )
        return pb.ListVersionsResponse(versions=[self._version(rt, v, c) for v, c in rows])

    async def WatchWeights(self, request, context):
        try:
            self._need(request.job)
            _check_after(request.after_version)
            if not 0 <= request.max_batch <= WATCH_BATCH_MAX:
                raise MixerError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"max_batch: must be in [0, {WATCH_BATCH_MAX}] versions per message, got {request.max_batch}",
                )
            await self.auth.check_grpc(context, request.job, "reader")
            rt = await self.rts.get(request.job)
        except (SQLAlchemyError, MixerError) as e:
            await abort(context, e)
        q = rt.subscribe()
        stop = asyncio.ensure_future(self._stop_into(q))
        per = max(1, request.max_batch)
        try:
            last = request.after_version
            while True:  # the history, a page at a time (a long one is never held whole)
                page = await asyncio.to_thread(self.rts.store.versions, rt.job.id, last, WATCH_HISTORY_PAGE)
                for msg in watch_messages([self._version(rt, v, c) for v, c in page], per):
                    yield msg
                if page:
                    last = page[-1][0].version
                if len(page) < WATCH_HISTORY_PAGE:
                    break
            while True:
                # Awaited directly: a published version reaches its watcher in one pass of the
                # loop (a task per get and asyncio.wait over two futures took three passes, each
                # as long as the ingest work queued in it). What was published with it goes in
                # the same message (one commit can make several versions): a message per version
                # would wait for each send to complete before the next.
                ready = [await q.get()]
                while len(ready) < per and not q.empty():
                    ready.append(q.get_nowait())
                new, stopping = [], False
                for v in ready:
                    if v is STOPPING:
                        stopping = True
                        break
                    if v.version > last:
                        new.append(self._version(rt, v))
                        last = v.version
                for msg in watch_messages(new, per):
                    yield msg
                if stopping:  # send the watcher on now, not after the grace
                    await context.abort(
                        grpc.StatusCode.UNAVAILABLE, "the server is shutting down; watch again (another server)"
                    )
        finally:
            stop.cancel()
            rt.unsubscribe(q)

    async def _stop_into(self, q: asyncio.Queue) -> None:
        """Once the server starts stopping: STOPPING into a watcher's queue (after what it holds)."""
        await self.rts.stopping.wait()
        if q.full():
            q.get_nowait()
        q.put_nowait(STOPPING)

    async def Session(self, request_iterator, context):
        # Until hello has come and its token is checked, a stream costs memory and proves nothing:
        # such streams are capped in number (--max-pending-sessions) and in time (--hello-timeout).
        if self.pending_sessions >= self.max_pending_sessions:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.pending_sessions} session streams are waiting for hello or authentication, the limit (--max-pending-sessions); retry later",
            )
        self.pending_sessions += 1
        pending = True
        try:
            # One iterator for the whole stream: a second aiter() may drop a message the first read ahead.
            requests = aiter(request_iterator)
            try:
                first = await asyncio.wait_for(anext(requests), self.hello_timeout)
            except StopAsyncIteration:
                return
            except TimeoutError:
                await context.abort(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"session: no hello within {self.hello_timeout:g} s (--hello-timeout); send hello first",
                )
            if isinstance(first, Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"session: {first.error}")
            if isinstance(first, ReceivedReports) or first.WhichOneof("kind") != "hello":
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, "session: the first message must be hello"
                )
            hello = first.hello
            try:
                self._need(hello.job, "hello.job")
                if not hello.source:
                    raise MixerError(
                        grpc.StatusCode.INVALID_ARGUMENT, "hello.source: a source name is required"
                    )
                principal = await self.auth.check_grpc(context, hello.job, "writer")
                self.pending_sessions -= 1  # authenticated (loading the job may take a while)
                pending = False
                rt = await self.rts.get(hello.job)
            except (SQLAlchemyError, MixerError) as e:
                await abort(context, e)
        finally:
            if pending:
                self.pending_sessions -= 1
        if rt.sessions >= self.rts.limits.max_sessions_per_job:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"job {rt.job.name!r} has {rt.sessions} sessions, the limit (--max-sessions-per-job)",
            )
        rt.sessions += 1
        try:
            async for item in SessionStream(self, rt, hello, requests, context, principal).run():
                yield item
        finally:
            rt.sessions -= 1
