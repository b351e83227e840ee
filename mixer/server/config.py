"""The settings of `mixer serve`, and the limits they range over.

`ServeConfig` is the one place a server setting is declared: its default, its range and its help
(mixer.config generates the command's options, `--config FILE` and `--set KEY=VALUE` from it); the
server (mixer.server.app), its worker processes (workers.py) and the tests all take it. The
limits' defaults that the service and the HTTP side also use are defined here once. This module
imports neither grpc nor the store, so `mixer --help` stays quick.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace
from pathlib import Path

from mixer.config import ConfigError, setting

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
HELLO_TIMEOUT_S = 10.0
"""Seconds a Session stream may stay open before sending hello."""
MAX_PENDING_SESSIONS = 1024
"""Session streams at once that have not sent hello or passed the token check."""
HTTP_REQUEST_TIMEOUT_S = 10.0
"""Seconds an HTTP connection has to deliver its request."""
HTTP_MAX_CONNECTIONS = 64
"""HTTP connections served at once."""
MAX_WORKERS = 256


GRPC_HANDSHAKE_TIMEOUT_S = 10.0
GRPC_IDLE_TIMEOUT_S = 300.0
GRPC_MAX_CONNECTIONS = 4096
MAX_TIMEOUT_S = 86_400.0
"""The longest timeout any option takes (a day): beyond it, the millisecond values gRPC takes overflow."""
MAX_CONNECTIONS = 1_000_000


@dataclass(kw_only=True)
class ServeConfig:
    """How `mixer serve` runs: one tree (mixer.config) from which the command's options come."""

    db: str = setting(
        "mixer.db", envvar="MIXER_DB", help="SQLite file path or database URL (postgresql://...)"
    )
    sqlite_synchronous: str = setting(
        "normal",
        choices=("normal", "full"),
        help="SQLite: normal survives a server crash; full also an OS crash or power loss (one sync per "
        "group commit). PostgreSQL's own synchronous_commit decides there",
    )
    host: str = setting("127.0.0.1", help="address to listen on")
    port: int = setting(50051, min=0, max=65535, help="gRPC port")
    http_port: int = setting(9400, min=0, max=65535, help="/metrics and /api (0: any free port)")
    grace_seconds: float = setting(
        10.0, min=0.0, max=MAX_TIMEOUT_S, unit="seconds", help="seconds in-flight calls get at shutdown"
    )
    max_message_bytes: int = setting(
        MAX_MESSAGE_BYTES, min=1024, max=2**31 - 1, help="gRPC message size limit"
    )
    max_samples_per_report: int = setting(1 << 20, min=1, help="larger reports are refused")
    max_domains: int = setting(100_000, min=1, help="domains per job")
    max_sessions_per_job: int = setting(1024, min=1, help="Session streams open at once per job")
    hello_timeout: float = setting(
        HELLO_TIMEOUT_S,
        gt=0.0,
        max=MAX_TIMEOUT_S,
        unit="seconds",
        help="seconds a Session stream may stay open before sending hello",
    )
    max_pending_sessions: int = setting(
        MAX_PENDING_SESSIONS,
        min=1,
        max=MAX_CONNECTIONS,
        help="Session streams at once not yet past hello and its token check; more get RESOURCE_EXHAUSTED",
    )
    grpc_handshake_timeout: float = setting(
        GRPC_HANDSHAKE_TIMEOUT_S,
        gt=0.0,
        max=MAX_TIMEOUT_S,
        unit="seconds",
        help="seconds a gRPC connection has to finish its handshake (TLS, the HTTP/2 preface); gRPC's own: 120",
    )
    grpc_idle_timeout: float = setting(
        GRPC_IDLE_TIMEOUT_S,
        gt=0.0,
        max=MAX_TIMEOUT_S,
        unit="seconds",
        help="a gRPC connection with no call for this many seconds gets GOAWAY (clients reconnect)",
    )
    grpc_max_connections: int = setting(
        GRPC_MAX_CONNECTIONS,
        min=1,
        max=MAX_CONNECTIONS,
        help="gRPC connections served at once; one more is closed as it is accepted",
    )
    http_timeout: float = setting(
        HTTP_REQUEST_TIMEOUT_S,
        gt=0.0,
        max=MAX_TIMEOUT_S,
        unit="seconds",
        help="seconds an HTTP connection has to send its request (and finish TLS)",
    )
    http_max_connections: int = setting(
        HTTP_MAX_CONNECTIONS,
        min=1,
        max=MAX_CONNECTIONS,
        help="HTTP connections served at once; more are answered 503",
    )
    auth: bool = setting(False, help="require bearer tokens (mixer token create)")
    insecure: bool = setting(False, help="allow a non-loopback --host without --auth")
    tls_cert: str | None = setting(
        None, help="server certificate (PEM): serve TLS (gRPC, and HTTPS on --http-port)"
    )
    tls_key: str | None = setting(None, help="server private key (PEM)")
    tls_client_ca: str | None = setting(
        None, help="require client certificates signed by this CA (mutual TLS)"
    )
    ha: bool = setting(
        False, help="share a PostgreSQL database with other servers; jobs are owned through leases"
    )
    server_id: str = setting("", help="this server's name in lease rows (default: its address)")
    advertise: str = setting("", help="address other servers send clients to (default: host:port)")
    lease_ttl: float = setting(
        5.0, min=0.1, max=MAX_TIMEOUT_S, unit="seconds", help="seconds a lease outlives its owner"
    )
    workers: int = setting(
        1,
        min=1,
        max=MAX_WORKERS,
        help="server processes sharing --port on PostgreSQL (implies --ha); worker i also on port+1+i, "
        "HTTP on http-port+i",
    )
    private_port: int = setting(0, derived=True)
    """A worker's own port besides the shared --port, set by the parent of --workers (0: none)."""

    def validate(self) -> list[str]:
        """Refuse a bad combination of settings (ConfigError naming the options); return warnings.

        Each setting's own range and choices are declared on it and checked by mixer.config.check,
        which calls this after them: check a configuration with `check(cfg)`."""
        if not is_loopback(self.host) and not self.auth and not self.insecure:
            raise ConfigError(
                f"refusing to serve on {self.host} without --auth; pass --insecure to do it anyway"
            )
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("--tls-cert and --tls-key go together")
        if self.sqlite_synchronous != "normal" and self.db.startswith("postgres"):
            raise ConfigError(
                "--sqlite-synchronous applies to SQLite only; on PostgreSQL an acknowledgement follows the server's synchronous_commit setting"
            )
        if self.ha and not self.db.startswith("postgres"):
            raise ConfigError("--ha needs a shared PostgreSQL database (--db postgresql://...)")
        self._validate_workers()
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise ConfigError(f"--{name.replace('_', '-')}: no such file {path}")
        warnings = []
        if not is_loopback(self.host) and self.auth and not self.tls_cert:
            warnings.append(
                f"serving on {self.host} with --auth but without TLS: bearer tokens cross the network in clear (gRPC and HTTP); "
                "pass --tls-cert and --tls-key, or terminate TLS in front of the server"
            )
        return warnings

    def _validate_workers(self) -> None:
        if self.workers == 1:
            return
        if not self.db.startswith("postgres"):
            raise ConfigError(
                f"--workers {self.workers} needs a shared PostgreSQL database (--db postgresql://...): "
                "a SQLite file serves one process"
            )
        if not 1 <= self.port <= 65535 - self.workers:
            raise ConfigError(
                f"--port: with --workers {self.workers}, must be in [1, {65535 - self.workers}] (worker i also takes port+1+i), got {self.port}"
            )
        if self.http_port and not 1 <= self.http_port <= 65536 - self.workers:
            raise ConfigError(
                f"--http-port: with --workers {self.workers}, must be 0 or in [1, {65536 - self.workers}] (worker i serves HTTP on http_port+i), got {self.http_port}"
            )
        if self.advertise and ":" in self.advertise.strip("[]").rsplit("]", 1)[-1]:
            raise ConfigError(
                f"--advertise: with --workers, give the host only (each worker advertises host:its own port), got {self.advertise!r}"
            )
        if not self.advertise and self.host in ("0.0.0.0", "::", ""):
            raise ConfigError(
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


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
