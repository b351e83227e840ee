"""Reporter: a background session for a training loop's reports.

The Reporter never blocks the training loop: reports go into a bounded in-memory buffer (and a
spill file beyond it), a background thread streams them over a session, resends whatever was
not acknowledged after a reconnect, and keeps the newest weight version for the loop to poll.

When the server it reaches does not own the job (`mixer serve --ha`, or `--workers N`), the
Reporter opens its session at the owner named in the answer and resends what was not
acknowledged (the owner's per-source marks answer a report it already has as a duplicate, so
nothing is logged twice). After `MAX_HOPS` redirects in a row it backs off and starts again from
its configured addresses.
"""

from __future__ import annotations

import itertools
import logging
import os
import struct
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path

import grpc

from mixer.client import MAX_HOPS, TlsConfig, auth_metadata, channel, owner_of, parse_addresses
from mixer.signals import Report
from mixer.types import ServedVersion
from mixer.v1 import mixer_pb2 as pb
from mixer.wire import report_to_proto, served_version_from_proto

log = logging.getLogger("mixer.reporter")

BATCH_REPORTS = 256
"""At most this many queued reports travel in one Session message (a ReportBatch)..."""
BATCH_BYTES = 1 << 20
"""...and at most this many bytes of them (a larger report travels alone)."""
MAX_BUFFER = 1 << 24
"""The largest `max_buffer` a Reporter takes: the reports it holds in memory (more spill to disk)."""
MAX_BACKOFF_S = 600.0
"""The longest wait between reconnection attempts a Reporter may be given (`max_backoff`)."""


_SERVICE = pb.DESCRIPTOR.services_by_name["MixerService"]
SESSION_METHOD = f"/{_SERVICE.full_name}/{_SERVICE.methods_by_name['Session'].name}"


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


def session_request(datas: list[bytes]) -> bytes:
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
        # Both stay open for the spill's life (closed in close()): no with-block fits.
        self._w = open(self.path, "ab")  # noqa: SIM115
        self._r = open(self.path, "rb")  # noqa: SIM115
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
        self.addresses = parse_addresses(address)
        for name, value in (("job", job), ("source", source)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name}: a non-empty name is required, got {value!r}")
        if not (isinstance(max_buffer, int) and 1 <= max_buffer <= MAX_BUFFER):
            raise ValueError(f"max_buffer: must be an integer in [1, {MAX_BUFFER}] reports, got {max_buffer!r}")
        if not (0 < max_backoff <= MAX_BACKOFF_S):  # a NaN fails too
            raise ValueError(f"max_backoff: must be in (0, {MAX_BACKOFF_S:g}] seconds, got {max_backoff}")
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
        self.current: ServedVersion | None = None
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

    def poll(self) -> ServedVersion | None:
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
            yield session_request(datas)

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
            # Requests go out as bytes built by session_request: queued reports are kept
            # serialized and are never parsed again to be sent.
            session = ch.stream_stream(
                SESSION_METHOD, request_serializer=None, response_deserializer=pb.SessionResponse.FromString
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
        v = served_version_from_proto(msg)
        if self.current is None or v.version > self.current.version:
            self.current = v
