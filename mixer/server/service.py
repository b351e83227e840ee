"""The gRPC servicer: mixer.v1.MixerService over the live runtimes."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time

import grpc
from sqlalchemy.exc import SQLAlchemyError

from mixer.server.auth import ALL_JOBS, CACHE_SECONDS, Authenticator
from mixer.server.config import HELLO_TIMEOUT_S, MAX_PENDING_SESSIONS
from mixer.server.errors import MixerError
from mixer.server.job import JobRuntime, StoredJob
from mixer.server.runtime import Runtimes
from mixer.spec import JobSpec, SpecError
from mixer.types import Version
from mixer.v1 import mixer_pb2 as pb
from mixer.v1 import mixer_pb2_grpc as pb_grpc
from mixer.wire import (
    WATCH_BATCH_MAX,
    ReceivedReports,
    parse_session_request,
    version_to_proto,
    watch_messages,
)

log = logging.getLogger("mixer.server")

_STOPPING = object()  # a session's output queue: the server is shutting down

WATCH_HISTORY_PAGE = 1024
"""Versions a watcher's history is read in, a page per database read."""

TOKEN_RECHECK_S = CACHE_SECONDS / 2
"""An open Session re-checks its token this often, against a verdict at most this old: a revoked
token's session ends within one token cache period (auth.CACHE_SECONDS), like its new calls."""


class Undecodable:
    """A request whose bytes are not a protobuf message of the method's type (see add_to_server)."""

    __slots__ = ("error",)

    def __init__(self, error: str):
        self.error = error


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
                    if v is _STOPPING:
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
        """Once the server starts stopping: _STOPPING into a watcher's queue (after what it holds)."""
        await self.rts.stopping.wait()
        if q.full():
            q.get_nowait()
        q.put_nowait(_STOPPING)

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
            async for item in _Session(self, rt, hello, requests, context, principal).run():
                yield item
        finally:
            rt.sessions -= 1


class _Session:
    """One Session stream past hello: takes reports, sends their acks (or nacks) and new weights,
    and ends when the reports end, on shutdown, on a protocol error or when its token is revoked.

    Everything here runs on the loop; results of admission and commits come back through the
    mailbox (mailbox.py) as calls of the closures `_admitted` and `_settled` return."""

    def __init__(self, svc: MixerService, rt: JobRuntime, hello: pb.Hello, requests, context, principal):
        self.svc = svc
        self.rts = svc.rts
        self.rt = rt
        self.hello = hello
        self.requests = requests
        self.context = context
        self.principal = principal
        self.out: asyncio.Queue = asyncio.Queue()
        self.latest: Version | None = None
        """The newest version published and not yet sent to this session."""
        self.flushing = False
        """A `_flush` of `latest` is scheduled on the loop."""
        self.unsettled = 0
        """Batches taken whose commit has not resolved yet."""
        self.all_settled = asyncio.Event()
        self.all_settled.set()

    async def run(self):
        rt = self.rt
        last = rt.marks.get(self.hello.source, (-1, -1))
        rt.listeners.add(self._published)
        yield pb.SessionResponse(
            welcome=pb.Welcome(
                job=rt.job.name,
                source=self.hello.source,
                last_step=last[0],
                last_seq=last[1],
                current=self.svc._version(rt, rt.engine.current),
                domains=rt.spec.domain_names,
                spec_json=rt.spec.to_json(),
            )
        )
        reader = asyncio.create_task(self._read())
        tasks = [reader, asyncio.create_task(self._stop_watch())]
        if self.principal is not None:
            tasks.append(asyncio.create_task(self._token_watch()))
        out = self.out
        try:
            while True:
                item = await out.get()
                if item is _STOPPING or isinstance(item, MixerError):
                    # Shutting down, or the session must end: take no more reports, acknowledge
                    # what was taken, end the stream (with the error's status).
                    reader.cancel()
                    await self.all_settled.wait()
                    while not out.empty():
                        queued = out.get_nowait()
                        if (
                            queued is not None
                            and queued is not _STOPPING
                            and not isinstance(queued, MixerError)
                        ):
                            yield queued
                    if isinstance(item, MixerError):
                        await self.context.abort(
                            item.code, item.message, trailing_metadata=item.trailing_metadata
                        )
                    return
                if item is None:
                    break
                yield item
            await reader
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(BaseException):
                    await t
            rt.listeners.discard(self._published)

    @staticmethod
    def _nack(step: int, seq: int, source: str, e: MixerError) -> pb.SessionResponse:
        return pb.SessionResponse(
            nack=pb.Nack(step=step, seq=seq, source=source, code=e.code.value[0], message=e.message)
        )

    def _one_settled(self) -> None:
        self.unsettled -= 1
        if not self.unsettled:
            self.all_settled.set()

    async def _read(self) -> None:
        try:
            await self._take()
        except MixerError as e:  # the stream broke the protocol: end it with e's status
            self.out.put_nowait(e)
            return
        await self.all_settled.wait()
        self.out.put_nowait(None)

    async def _take(self) -> None:
        async for req in self.requests:
            if self.rts.stopping.is_set():  # shutting down: take nothing more
                break
            if isinstance(req, Undecodable):
                raise MixerError(grpc.StatusCode.INVALID_ARGUMENT, f"session: {req.error}")
            if isinstance(req, ReceivedReports):
                msgs, batched = req, req.batched
            elif (kind := req.WhichOneof("kind")) == "report":
                msgs, batched = [req.report], False
            elif kind == "reports":
                msgs, batched = req.reports.reports, True
            else:
                continue
            msgs = self._own(msgs)
            if not msgs:
                continue
            self.unsettled += 1
            self.all_settled.clear()
            self.rts.begin_ingest(self.rt, msgs, self._admitted(batched, time.perf_counter()))

    def _own(self, msgs):
        """The reports of this session's source (hello.source) or of one below it (hello.source/...,
        e.g. a worker's "/val" reports); any other source's report is refused on its own."""
        own = self.hello.source
        below = own + "/"
        if all(m.source == own or m.source.startswith(below) for m in msgs):
            return msgs
        kept = []
        for m in msgs:
            if m.source == own or m.source.startswith(below):
                kept.append(m)
            else:
                e = MixerError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"source: {m.source[:200]!r} is neither this session's source {own[:200]!r} nor below it "
                    f"({own[:200]!r}/...); open a session per source",
                )
                self.svc.metrics.rejected("invalid")
                self.out.put_nowait(self._nack(m.step, m.seq, m.source, e))
        return kept

    def _admitted(self, batched: bool, t0: float):
        def on_taken(taken) -> None:  # on the loop, once the batch went through admission
            for msg, e in taken.refused:
                self.out.put_nowait(self._nack(msg.step, msg.seq, msg.source, e))
            if taken.acks:
                self.rts.when_settled(self.rt, taken, self._settled(taken, batched, t0))
                return
            self._one_settled()

        return on_taken

    def _settled(self, taken, batched: bool, t0: float):
        def done(err: MixerError | None) -> None:  # on the loop, once the batch's commit resolved
            out = self.out
            if err is not None:
                for ack in taken.acks:
                    out.put_nowait(self._nack(ack.step, ack.seq, ack.source, err))
            else:
                self.svc.metrics.ingest_seconds.observe(time.perf_counter() - t0)
                if batched:
                    # New weights (published just now, if this batch triggered an update)
                    # ride with the acknowledgement rather than in a message of their own.
                    resp = pb.SessionResponse()  # filled in place: each ack is copied once
                    resp.acks.acks.extend(taken.acks)
                    v = self._newest()
                    if v is not None:
                        resp.acks.latest.CopyFrom(self.rt.push_message(v))
                    out.put_nowait(resp)
                else:
                    for ack in taken.acks:
                        out.put_nowait(pb.SessionResponse(ack=ack))
            self._one_settled()

        return done

    def _published(self, v: Version) -> None:
        """A new version of the job (on the loop, JobRuntime.publish): sent with this session's
        next acknowledgement if one goes out in the same loop pass, else in a message of its own.
        A callback, not a task waiting on a queue: the session whose batch made the version
        takes it along with its acks at once, and waking a task for nothing cost a task step."""
        self.latest = v
        if not self.flushing:
            self.flushing = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self.flushing = False
        v = self._newest()
        if v is not None:  # no acknowledgement took it along
            self.out.put_nowait(pb.SessionResponse(version=self.rt.push_message(v)))

    def _newest(self) -> Version | None:
        """The newest version published and not yet sent to this session (None: none): a worker
        needs only the newest weights, the ones it was not sent are skipped."""
        v, self.latest = self.latest, None
        if v is not None:
            created = self.rt.created_at(v.version)
            if created:
                self.svc.metrics.push_seconds.observe(max(0.0, time.time() - created))
        return v

    async def _stop_watch(self) -> None:
        await self.rts.stopping.wait()
        self.out.put_nowait(_STOPPING)

    async def _token_watch(self) -> None:
        """End the session once its token is revoked (checked every TOKEN_RECHECK_S)."""
        while True:
            await asyncio.sleep(TOKEN_RECHECK_S)
            try:
                await self.svc.auth.check_grpc(
                    self.context, self.hello.job, "writer", max_age=TOKEN_RECHECK_S
                )
            except MixerError as e:
                self.out.put_nowait(
                    MixerError(e.code, f"session closed: token {self.principal.token_id}: {e.message}")
                )
                return
            except SQLAlchemyError as e:  # the database is down: its reports are refused anyway
                log.warning("session token check: the database is unavailable (%s)", e.__class__.__name__)
