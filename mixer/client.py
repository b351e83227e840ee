"""MixerClient: a blocking API for tools and scripts (the Reporter, for training loops, is in
mixer.reporter and shares this module's channel, credentials and redirect rules).

Every call has a deadline; unary calls retry UNAVAILABLE through the channel's service config.
Calls return the core types (mixer.types): `JobInfo`, `ServedVersion`, `ReportAck`.

Several servers may share one database (`mixer serve --ha`, or `--workers N`): each job is owned
by one of them, and another answers UNAVAILABLE with the owner's address in the trailing metadata
`mixer-owner`. Both clients follow it: `MixerClient` sends the call again to the owner (and
remembers it for that job), the `Reporter` opens its session there and resends what was not
acknowledged (the owner's per-source marks answer a report it already has as a duplicate, so
nothing is logged twice). At most `MAX_HOPS` redirects in a row; past that `MixerClient` raises
`RedirectError` and the Reporter backs off and starts again from its configured addresses.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import grpc

from mixer.server.errors import OWNER_METADATA
from mixer.signals import MAX_STEP, Report
from mixer.spec import JobSpec
from mixer.types import JobInfo, ReportAck, ServedVersion
from mixer.v1 import mixer_pb2 as pb
from mixer.v1 import mixer_pb2_grpc as pb_grpc
from mixer.wire import (
    WATCH_BATCH_MAX,
    job_info_from_proto,
    report_ack_from_proto,
    report_to_proto,
    served_version_from_proto,
)

DEFAULT_ADDRESS = "127.0.0.1:50051"
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


MAX_CALL_TIMEOUT_S = 86_400.0
"""A call's deadline at most (seconds)."""


def parse_addresses(address: str) -> list[str]:
    """The servers an address names: "host:port", or several separated by commas."""
    addresses = [a.strip() for a in address.split(",") if a.strip()] if isinstance(address, str) else []
    if not addresses:
        raise ValueError(f"address: give host:port, or several separated by commas; got {address!r}")
    return addresses


def _check_after(after: int) -> None:
    if not -1 <= after < MAX_STEP:
        raise ValueError(f"after: must be in [-1, 2^53) (-1: all), got {after}")


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
        self.addresses = parse_addresses(address)
        if not (0 < timeout <= MAX_CALL_TIMEOUT_S):  # a NaN fails too
            raise ValueError(f"timeout: must be in (0, {MAX_CALL_TIMEOUT_S:g}] seconds, got {timeout}")
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

    def __enter__(self) -> Self:
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

    def create_job(self, spec: str | JobSpec | dict[str, Any]) -> tuple[JobInfo, bool]:
        """Create a job from a spec (YAML or JSON text, a JobSpec, or a dict): the job, and False
        when it already existed with the same spec."""
        if isinstance(spec, JobSpec):
            spec = spec.to_json()
        elif isinstance(spec, dict):
            spec = json.dumps(spec)
        resp = self._call("CreateJob", pb.CreateJobRequest(spec=spec), "")
        return job_info_from_proto(resp.job), resp.created

    def get_job(self, name: str) -> JobInfo:
        """The job and its live state (newest version, highest step, report count)."""
        return job_info_from_proto(self._call("GetJob", pb.GetJobRequest(name=name), name).job)

    def finish_job(self, name: str) -> JobInfo:
        """Mark the job finished (readable, taking no more reports); the job as it is now."""
        return job_info_from_proto(self._call("FinishJob", pb.FinishJobRequest(name=name), name).job)

    def list_jobs(self) -> list[JobInfo]:
        """Every job the service knows."""
        resp = self.stub.ListJobs(pb.ListJobsRequest(), timeout=self.timeout, metadata=self._md)
        return [job_info_from_proto(j) for j in resp.jobs]

    def get_weights(self, job: str, *, step: int | None = None, version: int | None = None) -> ServedVersion:
        """The version in force at `step`, or version number `version`, or (neither) the newest."""
        req = pb.GetWeightsRequest(job=job)
        for name, value in (("step", step), ("version", version)):
            if value is not None and not 0 <= value < MAX_STEP:
                raise ValueError(f"{name}: must be in [0, 2^53), got {value}")
        if step is not None:
            req.step = step
        if version is not None:
            req.version = version
        return served_version_from_proto(self._call("GetWeights", req, job).version)

    def list_versions(self, job: str, after: int = -1, limit: int = 0) -> list[ServedVersion]:
        """The versions numbered above `after`, oldest first (at most `limit`; 0: all)."""
        _check_after(after)
        if not 0 <= limit < 1 << 31:
            raise ValueError(f"limit: must be in [0, 2^31) (0: all), got {limit}")
        resp = self._call("ListVersions", pb.ListVersionsRequest(job=job, after_version=after, limit=limit), job)
        return [served_version_from_proto(v) for v in resp.versions]

    def watch(
        self, job: str, after: int = -1, timeout: float | None = None, *, reconnect_for: float = 30.0
    ) -> Iterator[ServedVersion]:
        """The versions of `job` newer than `after`, in order, as the job's owner makes them; ends
        when `timeout` (seconds, the whole watch) runs out, with gRPC's DEADLINE_EXCEEDED.

        A stream that breaks (its owner died, or stopped) is opened again: at this client's
        addresses in turn, which send it on to the job's new owner, asking for the versions after
        the last one delivered, so none is lost or repeated. After `reconnect_for` seconds without a
        stream that delivers or is accepted, the last error is raised."""
        _check_after(after)
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
            # As many versions per message as the server allows: those one commit made arrive
            # together, not one send-and-wait each.
            call = self._stub(address).WatchWeights(
                pb.WatchWeightsRequest(job=job, after_version=after, max_batch=WATCH_BATCH_MAX),
                timeout=left,
                metadata=self._md,
            )
            try:
                for resp in call:
                    hops, backoff, broken_since = 0, WATCH_BACKOFF_S, None
                    for v in (resp.version, *resp.more):
                        after = v.version
                        yield served_version_from_proto(v)
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

    def report(self, job: str, report: Report | pb.Signals) -> ReportAck:
        """Send one report (unary; a training loop uses a Reporter): where it went in the log,
        whether it was a duplicate, and the newest version after it."""
        msg = report if isinstance(report, pb.Signals) else report_to_proto(report)
        return report_ack_from_proto(self._call("Report", pb.ReportRequest(job=job, signals=msg), job))
