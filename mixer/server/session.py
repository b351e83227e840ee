"""One Session stream past hello (MixerService.Session takes the hello): reports in, their
acknowledgements (or refusals) and the job's new weights out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

import grpc
from sqlalchemy.exc import SQLAlchemyError

from mixer.server.auth import CACHE_SECONDS
from mixer.server.errors import MixerError
from mixer.server.job import JobRuntime
from mixer.types import Version
from mixer.v1 import mixer_pb2 as pb
from mixer.wire import ReceivedReports, Undecodable

if TYPE_CHECKING:
    from mixer.server.service import MixerService

log = logging.getLogger("mixer.server")

STOPPING = object()
"""Put into a session's (or a watcher's) output queue: the server is shutting down."""

TOKEN_RECHECK_S = CACHE_SECONDS / 2
"""An open Session re-checks its token this often, against a verdict at most this old: a revoked
token's session ends within one token cache period (auth.CACHE_SECONDS), like its new calls."""


class SessionStream:
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
                if item is STOPPING or isinstance(item, MixerError):
                    # Shutting down, or the session must end: take no more reports, acknowledge
                    # what was taken, end the stream (with the error's status).
                    reader.cancel()
                    await self.all_settled.wait()
                    while not out.empty():
                        queued = out.get_nowait()
                        if (
                            queued is not None
                            and queued is not STOPPING
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
        self.out.put_nowait(STOPPING)

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
