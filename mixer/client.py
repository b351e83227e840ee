"""MixerClient: a blocking API for tools, and a background Reporter for training loops.

Every call has a deadline; unary calls retry UNAVAILABLE through the channel's service config.
The Reporter never blocks the training loop: reports go into a bounded in-memory buffer (and a
spill file beyond it), a background thread streams them over a session, resends whatever was
not acknowledged after a reconnect, and keeps the newest weight version for the loop to poll.

Several servers may share one database (`mixer serve --ha`, or `--workers N`): each job is owned
by one of them, and another answers UNAVAILABLE with the owner's address in the trailing metadata
`mixer-owner`. Both clients follow it: `MixerClient` sends the call again to the owner (and
remembers it for that job), the `Reporter` opens its session there and resends what was not
acknowledged (the owner's per-source marks answer a report it already has as a duplicate, so
nothing is logged twice). At most `MAX_HOPS` redirects in a row; past that `MixerClient` raises
`RedirectError` and the Reporter backs off and starts again from its configured addresses.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import struct
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from mixer.server.errors import OWNER_METADATA
from mixer.signals import Report
from mixer.spec import JobSpec
from mixer.types import Version
from mixer.v1 import mixer_pb2 as pb
from mixer.v1 import mixer_pb2_grpc as pb_grpc
from mixer.wire import report_to_proto, version_from_proto

log = logging.getLogger("mixer.client")

DEFAULT_ADDRESS = "127.0.0.1:50051"
BATCH_REPORTS = 256
"""At most this many queued reports travel in one Session message (a ReportBatch)..."""
BATCH_BYTES = 1 << 20
"""...and at most this many bytes of them (a larger report travels alone)."""
_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                # Unary calls only: the Session stream reconnects and resends itself, and a
                # transparently retried stream could replay or skip buffered reports.
                "name": [
                    {"service": "mixer.v1.MixerService", "method": m}
                    for m in (
                        "CreateJob",
                        "GetJob",
                        "ListJobs",
                        "FinishJob",
                        "Report",
                        "GetWeights",
                        "ListVersions",
                    )
                ],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)


# Reconnect quickly after a service restart (gRPC's default backoff grows to minutes).
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """TLS for a client: the CA that signed the server's certificate, and for mutual TLS a client certificate."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        def read(p: str | None) -> bytes | None:
            return Path(p).read_bytes() if p else None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca), private_key=read(self.key), certificate_chain=read(self.cert)
        )


def channel(address: str, tls: TlsConfig | None = None) -> grpc.Channel:
    options = [
        *FAST_RECONNECT,
        ("grpc.service_config", _SERVICE_CONFIG),
        ("grpc.enable_retries", 1),
        ("grpc.max_receive_message_length", 64 << 20),
        ("grpc.max_send_message_length", 64 << 20),
    ]
    if tls is not None:
        return grpc.secure_channel(address, tls.credentials(), options=options)
    return grpc.insecure_channel(address, options=options)


WATCH_BACKOFF_S = 0.05
WATCH_MAX_BACKOFF_S = 1.0
"""A broken watch is opened again after 0.05 s, doubling up to this while it keeps failing."""

MAX_HOPS = 4
"""Redirects to a job's owner followed in a row. One is the rule (any server -> the owner); more
happen only while ownership changes hands (an owner died and its lease is being taken over)."""


def owner_of(err: grpc.RpcError) -> str | None:
    """The owner's address a server that does not own the job answered with, if this is such an answer."""
    if not hasattr(err, "code") or err.code() != grpc.StatusCode.UNAVAILABLE:
        return None
    for key, value in err.trailing_metadata() or ():
        if key == OWNER_METADATA:
            return value if isinstance(value, str) else value.decode()
    return None


class RedirectError(grpc.RpcError):
    """Servers kept sending a call on to another owner (more than MAX_HOPS times): ownership of
    the job is changing hands, or the servers disagree about it. Retry later."""

    def __init__(self, what: str, path: list[str]):
        self.path = path
        self._details = (
            f"{what}: sent on {len(path) - 1} times ({' -> '.join(path)}) without reaching the job's owner "
            f"(at most {MAX_HOPS} hops); its ownership is changing hands, retry later"
        )
        super().__init__(self._details)

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple:
        return ()


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


class MixerClient:
    """Blocking client for tools and scripts; a call about a job goes to the job's owner."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: float = 10.0,
        token: str | None = None,
        tls: TlsConfig | None = None,
    ):
        """`address` may list several servers ("a:50051,b:50051"): calls go to the first, to the
        next ones in turn while it is down, and a watch whose stream breaks tries them in turn (any
        of them sends it on to the job's owner)."""
        self.addresses = [a.strip() for a in address.split(",") if a.strip()]
        if not self.addresses:
            raise ValueError(f"address: give host:port, or several separated by commas; got {address!r}")
        address = self.address = self.addresses[0]
        self.timeout = timeout
        self._tls = tls
        self._channel = channel(address, tls)
        self._md = auth_metadata(token)
        self.stub = pb_grpc.MixerServiceStub(self._channel)
        self._stubs: dict[str, tuple[grpc.Channel, pb_grpc.MixerServiceStub]] = {
            address: (self._channel, self.stub)
        }
        self._owners: dict[str, str] = {}
        """Job -> the address that last served it (after a redirect)."""

    def close(self) -> None:
        for ch, _ in self._stubs.values():
            ch.close()

    def __enter__(self) -> MixerClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        grpc.channel_ready_future(self._channel).result(timeout=timeout)

    def _stub(self, address: str) -> pb_grpc.MixerServiceStub:
        if address not in self._stubs:
            ch = channel(address, self._tls)
            self._stubs[address] = (ch, pb_grpc.MixerServiceStub(ch))
        return self._stubs[address][1]

    def _next_hop(
        self, err: grpc.RpcError, job: str, address: str, path: list[str], others: Iterator[str]
    ) -> str:
        """Where to send a call again that failed with `err` at `address`, or raise. `others`: the
        configured addresses this call has not tried yet."""
        owner = owner_of(err)
        if owner is None:
            if job and self._owners.get(job) == address:
                del self._owners[job]  # it failed: the next call asks where we started again
            if not hasattr(err, "code") or err.code() != grpc.StatusCode.UNAVAILABLE:
                raise err
            # A configured server is down: the next one not tried yet; once none is left, or when
            # the owner we were sent to is gone, ask again where we started.
            owner = next((a for a in others if a != address), None)
            if owner is None:
                if address == self.address:
                    raise err
                owner = self.address
        if len(path) > MAX_HOPS:
            raise RedirectError(f"job {job!r}" if job else "create job", path) from err
        path.append(owner)
        if job:
            self._owners[job] = owner
        return owner

    def _call(self, method: str, request, job: str):
        """A unary call, sent on to the job's owner when the server that got it does not own it."""
        address = self._owners.get(job, self.address) if job else self.address
        path = [address]
        others = iter(self.addresses[1:])
        while True:
            try:
                return getattr(self._stub(address), method)(request, timeout=self.timeout, metadata=self._md)
            except grpc.RpcError as e:
                address = self._next_hop(e, job, address, path, others)

    def create_job(self, spec: str | JobSpec | dict[str, Any]) -> tuple[pb.Job, bool]:
        if isinstance(spec, JobSpec):
            spec = spec.to_json()
        elif isinstance(spec, dict):
            spec = json.dumps(spec)
        resp = self._call("CreateJob", pb.CreateJobRequest(spec=spec), "")
        return resp.job, resp.created

    def get_job(self, name: str) -> pb.Job:
        return self._call("GetJob", pb.GetJobRequest(name=name), name).job

    def finish_job(self, name: str) -> pb.Job:
        return self._call("FinishJob", pb.FinishJobRequest(name=name), name).job

    def list_jobs(self) -> list[pb.Job]:
        return list(self.stub.ListJobs(pb.ListJobsRequest(), timeout=self.timeout, metadata=self._md).jobs)

    def get_weights(
        self, job: str, *, step: int | None = None, version: int | None = None
    ) -> pb.WeightVersion:
        req = pb.GetWeightsRequest(job=job)
        if step is not None:
            req.step = step
        if version is not None:
            req.version = version
        return self._call("GetWeights", req, job).version

    def list_versions(self, job: str, after: int = -1, limit: int = 0) -> list[pb.WeightVersion]:
        return list(
            self._call(
                "ListVersions", pb.ListVersionsRequest(job=job, after_version=after, limit=limit), job
            ).versions
        )

    def watch(
        self, job: str, after: int = -1, timeout: float | None = None, *, reconnect_for: float = 30.0
    ) -> Iterator[pb.WeightVersion]:
        """The versions of `job` newer than `after`, in order, as the job's owner makes them; ends
        when `timeout` (seconds, the whole watch) runs out, with gRPC's DEADLINE_EXCEEDED.

        A stream that breaks (its owner died, or stopped) is opened again: at this client's
        addresses in turn, which send it on to the job's new owner, asking for the versions after
        the last one delivered, so none is lost or repeated. After `reconnect_for` seconds without a
        stream that delivers or is accepted, the last error is raised."""
        if not 0 < reconnect_for <= 3600:
            raise ValueError(f"reconnect_for: must be in (0, 3600] seconds, got {reconnect_for}")
        if timeout is not None and not 0 < timeout:
            raise ValueError(f"timeout: must be a positive number of seconds or None, got {timeout}")
        deadline = None if timeout is None else time.monotonic() + timeout
        home = self.address
        address = self._owners.get(job, home)
        hops, backoff, broken_since = 0, WATCH_BACKOFF_S, None
        while True:
            left = None if deadline is None else max(0.001, deadline - time.monotonic())
            call = self._stub(address).WatchWeights(
                pb.WatchWeightsRequest(job=job, after_version=after), timeout=left, metadata=self._md
            )
            try:
                for resp in call:
                    after = resp.version.version
                    hops, backoff, broken_since = 0, WATCH_BACKOFF_S, None
                    yield resp.version
                return
            except grpc.RpcError as e:
                owner = owner_of(e)
                if owner is not None and hops < MAX_HOPS:
                    hops += 1
                    address = self._owners[job] = owner
                    continue
                if owner is None and e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    raise
                # The owner went away (or ownership is changing hands): ask again where the job is,
                # from the next configured address once the one we started from failed too.
                now = time.monotonic()
                broken_since = broken_since or now
                if now - broken_since > reconnect_for:
                    raise
                if self._owners.get(job) == address:
                    del self._owners[job]
                if address == home and owner is None and len(self.addresses) > 1:
                    home = self.addresses[(self.addresses.index(home) + 1) % len(self.addresses)]
                address, hops = home, 0
                time.sleep(backoff)
                backoff = min(WATCH_MAX_BACKOFF_S, backoff * 2)
            finally:
                call.cancel()

    def report(self, job: str, report: Report | pb.Signals) -> pb.ReportResponse:
        msg = report if isinstance(report, pb.Signals) else report_to_proto(report)
        return self._call("Report", pb.ReportRequest(job=job, signals=msg), job)


_SERVICE = pb.DESCRIPTOR.services_by_name["MixerService"]
_SESSION = f"/{_SERVICE.full_name}/{_SERVICE.methods_by_name['Session'].name}"


def _tag(message, field: str) -> bytes:
    """The wire tag of a length-delimited field (a message): field number, wire type 2."""
    return bytes([message.DESCRIPTOR.fields_by_name[field].number << 3 | 2])


_REPORT = _tag(pb.SessionRequest, "report")
_REPORTS = _tag(pb.SessionRequest, "reports")  # a ReportBatch
_BATCH_ITEM = _tag(pb.ReportBatch, "reports")


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _session_request(datas: list[bytes]) -> bytes:
    """A serialized SessionRequest carrying already-serialized Signals: one report, or a batch."""
    if len(datas) == 1:
        return _REPORT + _varint(len(datas[0])) + datas[0]
    batch = b"".join(_BATCH_ITEM + _varint(len(d)) + d for d in datas)
    return _REPORTS + _varint(len(batch)) + batch


class _Spill:
    """Length-prefixed report bytes on disk, read back in order (beyond the memory bound)."""

    def __init__(self, directory: str | None):
        fd, self.path = tempfile.mkstemp(prefix="mixer-spill-", suffix=".bin", dir=directory)
        os.close(fd)
        self._w = open(self.path, "ab")
        self._r = open(self.path, "rb")
        self.count = 0

    def push(self, data: bytes) -> None:
        self._w.write(struct.pack("<I", len(data)) + data)
        self._w.flush()
        self.count += 1

    def pop(self) -> bytes:
        (n,) = struct.unpack("<I", self._r.read(4))
        self.count -= 1
        return self._r.read(n)

    def close(self) -> None:
        self._w.close()
        self._r.close()
        Path(self.path).unlink(missing_ok=True)


class Reporter:
    """Background session for one worker: submit() never blocks; poll() gives new versions."""

    def __init__(
        self,
        address: str,
        job: str,
        source: str,
        *,
        max_buffer: int = 4096,
        spill_dir: str | None = None,
        max_backoff: float = 2.0,
        token: str | None = None,
        tls: TlsConfig | None = None,
        on_ack: Callable[[int, int], None] | None = None,
    ):
        """`address` may list several servers ("a:50051,b:50051"); on failure the next is tried.
        `on_ack(step, seq)` is called on the reporter's thread as each report is acknowledged."""
        self.addresses = [a.strip() for a in address.split(",") if a.strip()]
        self.address, self.job, self.source = self.addresses[0], job, source
        self._md = auth_metadata(token)
        self._tls = tls
        self._ack_hook = on_ack
        self.max_backoff = max_backoff
        self.max_buffer = max_buffer
        self._spill_dir = spill_dir
        self._spill: _Spill | None = None
        self._cv = threading.Condition()
        self._buffer: deque[tuple[tuple[int, int], bytes]] = deque()  # unacknowledged, oldest first
        # Acks not yet matched to the buffer's front, counted: an Ack names (step, seq) only, and
        # reports of two sources (a worker's and its "/val" one) may share a key on one session.
        self._acked: Counter[tuple[str, int, int]] = Counter()
        self._sent = 0  # how many of _buffer the current stream has sent
        self._closing = False
        self._stop = False
        self._stream_gen = 0
        self.current: Version | None = None
        self.domains: list[str] = []
        self._polled = -1
        self.acked = 0
        self.duplicates = 0
        self.rejected: list[pb.Nack] = []
        self.connected = threading.Event()
        self.resume_from: tuple[int, int] = (-1, -1)
        self.last_error = ""
        self._thread = threading.Thread(target=self._run, name=f"mixer-reporter-{source}", daemon=True)

    def start(self) -> Reporter:
        self._thread.start()
        return self

    # -- the training loop's side -----------------------------------------------------------

    def submit(self, report: Report | pb.Signals) -> None:
        """Queue a report; returns at once (beyond max_buffer reports go to a spill file)."""
        msg = report if isinstance(report, pb.Signals) else report_to_proto(report)
        key, data = (msg.source, msg.step, msg.seq), msg.SerializeToString()
        with self._cv:
            if self._spill is not None and self._spill.count or len(self._buffer) >= self.max_buffer:
                if self._spill is None:
                    self._spill = _Spill(self._spill_dir)
                self._spill.push(data)
            else:
                self._buffer.append((key, data))
            self._cv.notify_all()

    def poll(self) -> Version | None:
        """The newest version if it is newer than the last one polled, else None."""
        cur = self.current
        if cur is None or cur.version <= self._polled:
            return None
        self._polled = cur.version
        return cur

    def _unacked(self) -> int:  # under self._cv
        return len(self._buffer) + (self._spill.count if self._spill else 0)

    @property
    def pending(self) -> int:
        with self._cv:
            return self._unacked()

    def wait_pending(self, at_most: int, timeout: float | None = None) -> bool:
        """Block until at most `at_most` reports are unacknowledged (back-pressure for a producer
        that must not run ahead of the service); False if the timeout passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while self._unacked() > at_most:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(0.1 if left is None else min(left, 0.1))
        return True

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every submitted report is acknowledged (or the timeout passes)."""
        return self.wait_pending(0, timeout)

    def close(self, timeout: float = 30.0) -> bool:
        """Flush, then end the session. Returns whether everything was acknowledged."""
        ok = self.flush(timeout)
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=5)
        if self._spill is not None:
            self._spill.close()
        return ok

    # -- the background side ------------------------------------------------------------------

    def _requests(self, gen: int):
        yield pb.SessionRequest(hello=pb.Hello(job=self.job, source=self.source)).SerializeToString()
        while True:
            with self._cv:
                while not self._stop and gen == self._stream_gen and self._sent >= len(self._buffer):
                    self._refill()
                    if self._sent < len(self._buffer):
                        break
                    self._cv.wait(0.5)
                if self._stop or gen != self._stream_gen:
                    return
                # Everything queued and unsent goes in one message (up to a size bound): a worker
                # that reports faster than round trips pays one message per batch, not per report.
                datas, size = [], 0
                for _, data in itertools.islice(self._buffer, self._sent, self._sent + BATCH_REPORTS):
                    if datas and size + len(data) > BATCH_BYTES:
                        break
                    datas.append(data)
                    size += len(data)
                self._sent += len(datas)
            yield _session_request(datas)

    def _refill(self) -> None:
        while self._spill is not None and self._spill.count and len(self._buffer) < self.max_buffer:
            msg = pb.Signals.FromString(self._spill.pop())
            self._buffer.append(((msg.source, msg.step, msg.seq), msg.SerializeToString()))

    def _on_ack(self, *keys: tuple[str, int, int]) -> None:
        with self._cv:
            self._acked.update(keys)
            while self._buffer and self._acked[self._buffer[0][0]] > 0:
                k, _ = self._buffer.popleft()
                self._acked[k] -= 1
                if not self._acked[k]:
                    del self._acked[k]
                self._sent = max(0, self._sent - 1)
            self._refill()
            self._cv.notify_all()

    def _run(self) -> None:
        backoff = 0.05
        hops = 0  # redirects followed since the last welcome
        home = self.address  # the configured address the current chain of redirects started from
        while True:
            with self._cv:
                if self._stop:
                    return
                self._stream_gen += 1
                gen = self._stream_gen
                self._sent = 0  # resend everything unacknowledged on the new stream
            welcomed, owner = self._stream(gen)
            if welcomed:
                backoff, hops = 0.05, 0
            if owner is not None and hops < MAX_HOPS:
                # Not the job's owner: open the session at the owner's at once, and resend there.
                hops += 1
                self.address = owner
                continue
            if owner is not None:
                self.last_error = f"UNAVAILABLE: {hops} redirects in a row without reaching the owner of job {self.job!r} (last: {owner}); retrying from {home}"
                log.warning("%s", self.last_error)
                hops = 0
                self.address = home
            elif not welcomed:
                if self.address != home:
                    self.address = home  # the owner we were sent to is gone: ask where it is now
                elif len(self.addresses) > 1:
                    # This server would not take the session (down): try the next configured one.
                    self.address = home = self.addresses[
                        (self.addresses.index(home) + 1) % len(self.addresses)
                    ]
            with self._cv:
                if self._stop:
                    return
                self._cv.wait(backoff)
            backoff = min(self.max_backoff, backoff * 2)

    def _stream(self, gen: int) -> tuple[bool, str | None]:
        """One session stream to self.address until it ends: (welcomed, the owner's address if
        this server sent us there)."""
        ch = channel(self.address, self._tls)
        welcomed, owner = False, None
        try:
            # Requests go out as bytes built by _session_request: queued reports are kept
            # serialized and are never parsed again to be sent.
            session = ch.stream_stream(
                _SESSION, request_serializer=None, response_deserializer=pb.SessionResponse.FromString
            )
            call = session(self._requests(gen), metadata=self._md)
            for resp in call:
                kind = resp.WhichOneof("kind")
                if kind == "welcome":
                    self.resume_from = (resp.welcome.last_step, resp.welcome.last_seq)
                    self.domains = list(resp.welcome.domains)
                    self._set_version(resp.welcome.current)
                    self.connected.set()
                    welcomed = True
                elif kind in ("ack", "acks"):
                    acks = [resp.ack] if kind == "ack" else resp.acks.acks
                    if kind == "acks" and resp.acks.HasField("latest"):
                        self._set_version(resp.acks.latest)
                    self.acked += len(acks)
                    self.duplicates += sum(a.duplicate for a in acks)
                    self._on_ack(*((a.source or self.source, a.step, a.seq) for a in acks))
                    if self._ack_hook is not None:
                        for a in acks:
                            self._ack_hook(a.step, a.seq)
                elif kind == "version":
                    self._set_version(resp.version)
                elif kind == "nack":
                    if resp.nack.code == grpc.StatusCode.UNAVAILABLE.value[0]:
                        break  # the service is reloading the job (or lost it): reconnect and resend
                    # Refused for good (invalid): drop it so it is not resent forever.
                    self.rejected.append(resp.nack)
                    log.error(
                        "report step %d seq %d refused: %s", resp.nack.step, resp.nack.seq, resp.nack.message
                    )
                    self._on_ack((resp.nack.source or self.source, resp.nack.step, resp.nack.seq))
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            owner = owner_of(e)
            if code in (
                grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.PERMISSION_DENIED,
                grpc.StatusCode.UNAUTHENTICATED,
            ):
                log.error("session for job %s refused: %s", self.job, e.details())
            self.last_error = (
                f"{code.name if code else 'ERROR'}: {e.details() if hasattr(e, 'details') else e}"
            )
        finally:
            self.connected.clear()
            with self._cv:
                self._stream_gen += 1  # ends the request generator of this stream
                self._cv.notify_all()
            ch.close()
        return welcomed, owner

    def _set_version(self, msg: pb.WeightVersion) -> None:
        v = version_from_proto(msg)
        if self.current is None or v.version > self.current.version:
            self.current = v
