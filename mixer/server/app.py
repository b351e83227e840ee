"""`mixer serve`: the gRPC server, its HTTP side, and graceful shutdown."""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import logging
import os
import signal
import ssl
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Gauge

from mixer.server import http as http_side
from mixer.server import service
from mixer.server.auth import Authenticator
from mixer.server.http import HttpSide
from mixer.server.metrics import Metrics
from mixer.server.runtime import HaConfig, Limits, Runtimes
from mixer.server.service import MixerService
from mixer.store import Store, normalize_url, redact
from mixer.store.repository import SQLITE_SYNCHRONOUS, Fence
from mixer.store.writer import GroupCommitWriter
from mixer.v1 import mixer_pb2

log = logging.getLogger("mixer.server")

SERVICE_NAME = mixer_pb2.DESCRIPTOR.services_by_name["MixerService"].full_name
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


GRPC_HANDSHAKE_TIMEOUT_S = 10.0
GRPC_IDLE_TIMEOUT_S = 300.0
GRPC_MAX_CONNECTIONS = 4096
MAX_TIMEOUT_S = 86_400.0
"""The longest timeout any option takes (a day): beyond it, the millisecond values gRPC takes overflow."""
MAX_CONNECTIONS = 1_000_000


@dataclass(kw_only=True, slots=True)
class ServeConfig:
    """How `mixer serve` runs."""

    db: str = "mixer.db"
    """Database URL (postgresql://...) or a SQLite file path."""
    sqlite_synchronous: str = "normal"
    """SQLite only (WAL mode): "normal" (an acknowledged report survives the server crashing, not
    always the OS crashing or power loss) or "full" (a sync per commit: it survives those too).
    PostgreSQL's own `synchronous_commit` decides there."""
    host: str = "127.0.0.1"
    port: int = 50051
    http_port: int = 9400
    """Port of /metrics and /api (0: any free port)."""
    grace_seconds: float = 10.0
    max_message_bytes: int = MAX_MESSAGE_BYTES
    max_samples_per_report: int = 1 << 20
    max_domains: int = 100_000
    max_sessions_per_job: int = 1024
    hello_timeout: float = service.HELLO_TIMEOUT_S
    """Seconds a Session stream may stay open before sending hello."""
    max_pending_sessions: int = service.MAX_PENDING_SESSIONS
    """Session streams at once that have not sent hello or passed the token check; more are refused."""
    grpc_handshake_timeout: float = GRPC_HANDSHAKE_TIMEOUT_S
    """Seconds a new gRPC connection has to finish its handshake (TLS, and the HTTP/2 preface and
    settings); then it is closed. gRPC's own default is 120 s."""
    grpc_idle_timeout: float = GRPC_IDLE_TIMEOUT_S
    """Seconds a gRPC connection may stay open without a call; then the server sends GOAWAY and
    closes it (a client reconnects by itself at its next call). gRPC's own default: never."""
    grpc_max_connections: int = GRPC_MAX_CONNECTIONS
    """gRPC connections open at once; one more is closed as it is accepted."""
    http_timeout: float = http_side.REQUEST_TIMEOUT_S
    """Seconds an HTTP connection has to deliver its request (and finish its TLS handshake)."""
    http_max_connections: int = http_side.MAX_CONNECTIONS
    """HTTP connections served at once; one more is answered 503."""
    auth: bool = False
    """Require bearer tokens (see `mixer token create`)."""
    insecure: bool = False
    """Allow a non-loopback address without auth."""
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    """Require client certificates signed by this CA (mutual TLS)."""
    ha: bool = False
    """Share the database with other servers; each job is owned by one through a lease."""
    server_id: str = ""
    """This server's name in lease rows (default: host:port)."""
    advertise: str = ""
    """The address other servers send clients to (default: host:port)."""
    lease_ttl: float = 5.0
    workers: int = 1
    """Server processes on this host (`workers.py`): they share --port (SO_REUSEPORT) and a
    PostgreSQL database, each job owned by one of them through a lease (--ha is implied). Worker i
    also listens on port+1+i, the address it advertises, and serves HTTP on http_port+i."""
    private_port: int = 0
    """A worker's own port besides the shared --port, set by the parent of --workers (0: none)."""

    def validate(self) -> list[str]:
        """Refuse a bad configuration (SystemExit naming the option); return warnings."""
        if not is_loopback(self.host) and not self.auth and not self.insecure:
            raise SystemExit(
                f"refusing to serve on {self.host} without --auth; pass --insecure to do it anyway"
            )
        for name, value in (
            ("hello_timeout", self.hello_timeout),
            ("http_timeout", self.http_timeout),
            ("grpc_handshake_timeout", self.grpc_handshake_timeout),
            ("grpc_idle_timeout", self.grpc_idle_timeout),
        ):
            if not 0 < value <= MAX_TIMEOUT_S:
                raise SystemExit(
                    f"--{name.replace('_', '-')}: must be in (0, {MAX_TIMEOUT_S:g}] seconds, got {value}"
                )
        for name, value in (
            ("max_pending_sessions", self.max_pending_sessions),
            ("http_max_connections", self.http_max_connections),
            ("grpc_max_connections", self.grpc_max_connections),
        ):
            if not 1 <= value <= MAX_CONNECTIONS:
                raise SystemExit(
                    f"--{name.replace('_', '-')}: must be in [1, {MAX_CONNECTIONS}], got {value}"
                )
        if bool(self.tls_cert) != bool(self.tls_key):
            raise SystemExit("--tls-cert and --tls-key go together")
        if self.sqlite_synchronous not in SQLITE_SYNCHRONOUS:
            raise SystemExit(
                f"--sqlite-synchronous: must be one of {', '.join(SQLITE_SYNCHRONOUS)}, got {self.sqlite_synchronous!r}"
            )
        if self.sqlite_synchronous != "normal" and self.db.startswith("postgres"):
            raise SystemExit(
                "--sqlite-synchronous applies to SQLite only; on PostgreSQL an acknowledgement follows the server's synchronous_commit setting"
            )
        if self.ha and not self.db.startswith("postgres"):
            raise SystemExit("--ha needs a shared PostgreSQL database (--db postgresql://...)")
        self._validate_workers()
        if self.tls_client_ca and not self.tls_cert:
            raise SystemExit("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise SystemExit(f"--{name.replace('_', '-')}: no such file {path}")
        warnings = []
        if not is_loopback(self.host) and self.auth and not self.tls_cert:
            warnings.append(
                f"serving on {self.host} with --auth but without TLS: bearer tokens cross the network in clear (gRPC and HTTP); "
                "pass --tls-cert and --tls-key, or terminate TLS in front of the server"
            )
        return warnings

    def _validate_workers(self) -> None:
        if not 1 <= self.workers <= MAX_WORKERS:
            raise SystemExit(f"--workers: must be in [1, {MAX_WORKERS}], got {self.workers}")
        if self.workers == 1:
            return
        if not self.db.startswith("postgres"):
            raise SystemExit(
                f"--workers {self.workers} needs a shared PostgreSQL database (--db postgresql://...): "
                "a SQLite file serves one process"
            )
        if not 1 <= self.port <= 65535 - self.workers:
            raise SystemExit(
                f"--port: with --workers {self.workers}, must be in [1, {65535 - self.workers}] (worker i also takes port+1+i), got {self.port}"
            )
        if self.http_port and not 1 <= self.http_port <= 65536 - self.workers:
            raise SystemExit(
                f"--http-port: with --workers {self.workers}, must be 0 or in [1, {65536 - self.workers}] (worker i serves HTTP on http_port+i), got {self.http_port}"
            )
        if self.advertise and ":" in self.advertise.strip("[]").rsplit("]", 1)[-1]:
            raise SystemExit(
                f"--advertise: with --workers, give the host only (each worker advertises host:its own port), got {self.advertise!r}"
            )
        if not self.advertise and self.host in ("0.0.0.0", "::", ""):
            raise SystemExit(
                f"--host {self.host} with --workers: pass --advertise HOST, the address clients reach this machine at"
            )

    def worker(self, i: int) -> ServeConfig:
        """Worker i's configuration (of --workers N): the shared port, its own port and HTTP port."""
        private = self.port + 1 + i
        host = self.advertise or self.host
        me = f"{host}:{private}"
        return replace(
            self,
            workers=1,
            ha=True,
            private_port=private,
            http_port=self.http_port + i if self.http_port else 0,
            advertise=me,
            server_id=f"{self.server_id}/{i}" if self.server_id else me,
        )


MAX_WORKERS = 256


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _credentials(cfg: ServeConfig) -> grpc.ServerCredentials:
    pair = [(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())]
    if cfg.tls_client_ca:
        return grpc.ssl_server_credentials(
            pair, root_certificates=Path(cfg.tls_client_ca).read_bytes(), require_client_auth=True
        )
    return grpc.ssl_server_credentials(pair)


def _http_ssl(cfg: ServeConfig) -> ssl.SSLContext | None:
    """The HTTP side's TLS: the gRPC side's certificate, and its client CA when mutual TLS is on."""
    if not cfg.tls_cert:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    if cfg.tls_client_ca:
        ctx.load_verify_locations(cfg.tls_client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def lock_sqlite(db: str, owner: str) -> IO | None:
    """One server per SQLite file: an exclusive lock on `<file>.lock`, held while this process lives.

    The kernel drops the lock when the process ends, however it ends (kill -9 included), so a
    stale lock file never blocks a restart. PostgreSQL is not locked: servers share it with --ha."""
    import fcntl

    from sqlalchemy.engine import make_url

    url = make_url(normalize_url(db))
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    path = Path(url.database).resolve()
    lock_path = path.with_name(path.name + ".lock")
    try:
        f = open(lock_path, "a+")  # noqa: SIM115 - held open for the life of the server
    except OSError as e:
        raise SystemExit(f"cannot open the lock file {lock_path}: {e.strerror}") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise SystemExit(
            f"database {path} is in use by another mixer server ({holder}; lock file {lock_path}); "
            "a SQLite file serves one server at a time (share a PostgreSQL database with --ha instead)"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}, serving {owner}\n")
    f.flush()
    return f


GC_GEN0_THRESHOLD = 20_000
"""Allocations between young-generation collections (Python's default: 700)."""
SWITCH_INTERVAL_S = 0.001
"""How long a thread may hold the interpreter lock while another waits (Python's default: 5 ms)."""


def _tune_interpreter() -> None:
    """Keep the interpreter's pauses off the acknowledgement path, once the server is up.

    The cyclic garbage collector: everything built at start-up (modules, the gRPC server,
    SQLAlchemy's metadata) moves to a permanent generation, so a full collection no longer walks
    it, and young collections run every 20,000 allocations instead of 700. The hot path leaves no
    cycles behind (the collector finds next to nothing while reports stream). Under
    `mixer bench load` this took the ack p99 from ~100 ms to ~60 ms.

    The lock hand-over: the group-commit thread gives up the interpreter lock at every database
    call and then waits for the event loop to hand it back; at Python's default interval a commit
    took ~10 ms of waiting under load, at 1 ms ~4.5 ms (server-side ack lag 20 -> 14 ms)."""
    gc.collect()
    gc.freeze()
    _, g1, g2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, g1, g2)
    sys.setswitchinterval(SWITCH_INTERVAL_S)


@dataclass(slots=True)
class _Backend:
    """What a server process holds besides its listeners: the database, its writer, the live jobs."""

    store: Store
    writer: GroupCommitWriter
    runtimes: Runtimes
    metrics: Metrics
    auth: Authenticator
    ha: HaConfig | None
    durability: dict[str, str]

    def close(self) -> None:
        self.writer.close()
        self.store.close()


def _backend(cfg: ServeConfig) -> _Backend:
    # A lease holder paused inside a commit must not keep the lease row locked past its TTL.
    store = Store(
        cfg.db,
        sqlite_synchronous=cfg.sqlite_synchronous,
        max_transaction_idle=cfg.lease_ttl if cfg.ha else None,
    )
    durability = store.durability()
    runtimes: Runtimes
    metrics = Metrics(lambda: list(runtimes.jobs.values()))
    ha = None
    if cfg.ha:
        me = cfg.advertise or f"{cfg.host}:{cfg.port}"
        ha = HaConfig(server_id=cfg.server_id or me, address=me, ttl=cfg.lease_ttl)
    writer = GroupCommitWriter(
        store, on_commit=metrics.observe_commit, fence=Fence(ha.server_id, ha.ttl) if ha else None
    )
    limits = Limits(
        max_samples_per_report=cfg.max_samples_per_report,
        max_domains=cfg.max_domains,
        max_sessions_per_job=cfg.max_sessions_per_job,
    )
    runtimes = Runtimes(store, writer, limits, metrics, ha)
    store_info = Gauge(
        "mixer_store_info",
        "1, labelled with the database and what its commits promise (read back from it)",
        list(durability),
        registry=metrics.registry,
    )
    store_info.labels(**durability).set(1)
    return _Backend(store, writer, runtimes, metrics, Authenticator(store, cfg.auth), ha, durability)


def _grpc_server(cfg: ServeConfig, b: _Backend) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    """The gRPC server with its services, bound to --port (and a worker's own port): (server, health, port)."""
    opts = [
        ("grpc.max_receive_message_length", cfg.max_message_bytes),
        ("grpc.max_send_message_length", cfg.max_message_bytes),
        # Workers of one host share --port: the kernel spreads new connections over them.
        ("grpc.so_reuseport", 1 if cfg.private_port else 0),
        # Connections that never open a call: a peer that connects and stays silent (or never
        # finishes TLS) is closed after the handshake timeout, one that finishes the handshake
        # but opens no call after the idle timeout, and past the cap new ones are refused.
        ("grpc.server_handshake_timeout_ms", int(cfg.grpc_handshake_timeout * 1000)),
        ("grpc.max_connection_idle_ms", int(cfg.grpc_idle_timeout * 1000)),
        ("grpc.max_allowed_incoming_connections", cfg.grpc_max_connections),
    ]
    server = grpc.aio.server(options=opts)
    servicer = MixerService(
        b.runtimes,
        b.metrics,
        b.auth,
        hello_timeout=cfg.hello_timeout,
        max_pending_sessions=cfg.max_pending_sessions,
    )
    service.add_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    bound = 0
    for port in (cfg.port, cfg.private_port) if cfg.private_port else (cfg.port,):
        address = f"{cfg.host}:{port}"
        try:  # grpcio returns 0 or (newer) raises RuntimeError
            got = (
                server.add_secure_port(address, _credentials(cfg))
                if cfg.tls_cert
                else server.add_insecure_port(address)
            )
        except RuntimeError:
            got = 0
        if got == 0:
            b.close()
            raise SystemExit(f"cannot bind gRPC to {address} (--port): is another server running there?")
        bound = bound or got
    return server, health_servicer, bound


async def _set_health(health_servicer: health.aio.HealthServicer, status) -> None:
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, status)


async def serve(cfg: ServeConfig, ready: asyncio.Event | None = None) -> None:
    for warning in cfg.validate():
        log.warning("%s", warning)
    lock = lock_sqlite(cfg.db, f"{cfg.host}:{cfg.port}")
    b = _backend(cfg)
    server, health_servicer, bound = _grpc_server(cfg, b)
    serving = True
    try:
        http = HttpSide(
            cfg.host,
            cfg.http_port,
            b.metrics,
            b.runtimes,
            lambda: serving,
            b.auth,
            request_timeout=cfg.http_timeout,
            max_connections=cfg.http_max_connections,
            ssl_context=_http_ssl(cfg),
        )
    except OSError as e:
        b.close()
        raise SystemExit(
            f"cannot bind the HTTP side to {cfg.host}:{cfg.http_port} (--http-port): {e.strerror or e}; is another server running there?"
        ) from None
    await server.start()
    http.start()
    await _set_health(health_servicer, health_pb2.HealthCheckResponse.SERVING)
    mode = ("mTLS" if cfg.tls_client_ca else "TLS") if cfg.tls_cert else "plaintext"
    stored = " ".join(f"{k}={v}" for k, v in b.durability.items())
    also = f" and {cfg.host}:{cfg.private_port}" if cfg.private_port else ""
    log.info(
        "mixer serving on %s:%d%s (%s, auth %s, %s %d), database %s (%s)",
        cfg.host,
        bound,
        also,
        mode,
        "on" if cfg.auth else "off",
        http.scheme,
        http.port,
        redact(b.store.url),
        stored,
    )
    print(
        f"mixer serving on {cfg.host}:{bound}{also} ({mode}, auth {'on' if cfg.auth else 'off'}) {http.scheme}={http.port} db={redact(b.store.url)} {stored}",
        flush=True,
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    leases = asyncio.create_task(b.runtimes.keep_leases()) if b.ha else None
    _tune_interpreter()
    if ready is not None:
        ready.set()
    await stop.wait()
    # Graceful: stop advertising, let in-flight reports commit and be acknowledged, then exit.
    serving = False
    await _set_health(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
    b.runtimes.stopping.set()
    await server.stop(cfg.grace_seconds)
    b.runtimes.close()  # lanes finish what they admit before the last commits
    b.writer.close()
    if leases is not None:
        leases.cancel()
        b.store.release_leases(b.ha.server_id)  # hand our jobs over at once instead of after the TTL
    http.stop()
    b.store.close()
    if lock is not None:
        lock.close()
    log.info("mixer stopped")
