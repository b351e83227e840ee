"""The HTTP side: Prometheus text at /metrics, health at /healthz, JSON under /api/, the page at /.

JSON:
  /api/jobs                          every job in the database (live state where it is loaded)
  /api/jobs/NAME                     one job
  /api/jobs/NAME/versions            ?tail=N (the newest N) or ?after=V: weights, effective step, and
                                     the step a worker first reported applying each version
  /api/jobs/NAME/versions/V          one version with its full parameters (e.g. all topic weights)
  /api/jobs/NAME/loss                ?after_seq=S&limit=N: per-step, per-domain training-loss sums
                                     and token counts from the log after S (a derived job shows its
                                     source's); "reset": the reader should drop what it has

The page (/ and /jobs/NAME, see page.py) is a static shell without data: its script reads the
JSON above, so with auth on it carries the reader's bearer token like any other client.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import socket
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import islice
from urllib.parse import parse_qs, unquote, urlparse

import grpc
import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.exc import SQLAlchemyError

from mixer.replay import log_owner
from mixer.server import page
from mixer.server.config import HTTP_MAX_CONNECTIONS, HTTP_REQUEST_TIMEOUT_S
from mixer.server.errors import MixerError
from mixer.server.job import StoredJob
from mixer.spec import NAME_RE, JobSpec
from mixer.v1 import mixer_pb2 as pb
from mixer.wire import version_json

log = logging.getLogger("mixer.server")

LINGER_S = 2.0
MAX_TAIL = 5000


class HttpError(Exception):
    def __init__(self, code: int, message: str):
        self.code = code
        self.message = message


def _finite(x: float) -> float | None:
    # JSON has no NaN or Infinity; the page treats null as "not measured".
    return float(x) if math.isfinite(x) else None


def _job_json(job, spec, newest, *, loss, max_step: int, reports: int, applied_lag, loaded: bool) -> dict:
    """The one JSON form of a job (/api/jobs): its stored row, its spec and its newest version."""
    return {
        "name": job.name,
        "strategy": spec.strategy.name,
        "domains": spec.domain_names,
        "version": newest.version if newest else -1,
        "effective_step": newest.effective_step if newest else -1,
        "weights": newest.weights.tolist() if newest else spec.prior(),
        "loss": None if loss is None else [_finite(x) for x in loss],
        "max_step": max_step,
        "reports": reports,
        "source_job": job.source_job,
        "lineage": spec.lineage,
        "status": job.status,
        "applied_lag_steps": applied_lag,
        "loaded": loaded,
    }


def _live_job_json(rt) -> dict:
    """A job this server has loaded: its live state."""
    return _job_json(
        rt.job,
        rt.spec,
        rt.engine.current,
        loss=rt.last_loss,
        max_step=rt.engine.max_step,
        reports=rt.report_count,
        applied_lag=rt.applied_lag,
        loaded=True,
    )


def _stored_job_json(stored: StoredJob) -> dict:
    """A job this server has not loaded (no session or RPC has touched it since start)."""
    return _job_json(
        stored.job,
        stored.spec,
        stored.newest,
        loss=None,
        max_step=stored.max_step,
        reports=stored.report_count,
        applied_lag=None,
        loaded=False,
    )


class JobData:
    """Reads behind the JSON API: the store, plus a small per-job cache of scanned log positions."""

    def __init__(self, runtimes):
        self.runtimes = runtimes
        self.store = runtimes.store
        self._lock = threading.Lock()
        self._applied: dict[int, tuple[int, dict[int, int]]] = {}
        """job id -> (highest log seq scanned, version -> first step a worker reported applying it)."""

    def record(self, name: str):
        rec = self.store.get_job(name)
        if rec is None:
            raise HttpError(404, f"job {name!r} not found")
        return rec

    def jobs(self) -> list[dict]:
        live = dict(self.runtimes.jobs)
        return [
            _live_job_json(live[r.name])
            if r.name in live
            else _stored_job_json(StoredJob.read(self.store, r))
            for r in self.store.list_jobs()
        ]

    def job(self, name: str) -> dict:
        rt = self.runtimes.jobs.get(name)
        return (
            _live_job_json(rt)
            if rt is not None
            else _stored_job_json(StoredJob.read(self.store, self.record(name)))
        )

    def versions(self, name: str, after: int | None, tail: int) -> dict:
        rec = self.record(name)
        if after is None:
            newest = self.store.version(rec.id)
            after = -1 if newest is None else newest[0].version - tail
        rows = self.store.versions(rec.id, after=after, limit=MAX_TAIL)
        applied = self.applied_steps(rec.id)
        return {
            "job": name,
            "domains": JobSpec.from_json(rec.spec_json).domain_names,
            "versions": [version_json(v, t, applied.get(v.version)) for v, t in rows],
        }

    def version(self, name: str, number: int) -> dict:
        rec = self.record(name)
        found = self.store.version(rec.id, number=number)
        if found is None:
            raise HttpError(404, f"job {name!r} has no version {number}")
        return version_json(found[0], found[1], self.applied_steps(rec.id).get(number), full=True)

    def applied_steps(self, job_id: int) -> dict[int, int]:
        """First step at which a worker reported applying each version; scans only the new log."""
        with self._lock:
            seen, first = self._applied.get(job_id, (-1, {}))
            top = self.store.max_seq(job_id)
            if top > seen:
                first = dict(first)
                for v, step in self.store.first_applied_steps(job_id, seen, top).items():
                    first[v] = min(step, first.get(v, step))
                self._applied[job_id] = (top, first)
            return first

    def loss(self, name: str, after_seq: int | None, limit: int) -> dict:
        rec = self.record(name)
        # A derived job stores versions only; its loss is that of the log its versions came from.
        owner = log_owner(self.store, rec, strict=False)
        domains = JobSpec.from_json(rec.spec_json).domain_names
        top = self.store.max_seq(owner.id)
        # A first read, a reader that fell far behind, or one ahead of this log (another database
        # behind the same address) starts over at the tail: this feeds a chart, not an export.
        reset = after_seq is None or after_seq > top or top - after_seq > limit
        start = max(-1, top - limit) if reset else after_seq
        by_step: dict[int, list[np.ndarray]] = {}
        last = start
        for r in islice(self.store.signals(owner.id, after_seq=start, batch=min(limit, 2000)), limit):
            last = r.seq
            msg = pb.Signals.FromString(r.payload)
            if len(msg.domain_token_count) != len(domains) or len(msg.domain_loss_sum) != len(domains):
                continue
            acc = by_step.setdefault(r.step, [np.zeros(len(domains)), np.zeros(len(domains))])
            acc[0] += msg.domain_loss_sum
            acc[1] += msg.domain_token_count
        points = [
            {"step": s, "loss_sum": a[0].tolist(), "tokens": a[1].tolist()}
            for s, a in sorted(by_step.items())
        ]
        return {
            "job": name,
            "log_job": owner.name,
            "domains": domains,
            "next_seq": last,
            "reset": reset,
            "points": points,
        }


def _int_arg(
    query: dict, name: str, default: int | None, lo: int | None = None, hi: int | None = None
) -> int | None:
    raw = query.get(name)
    if not raw:
        return default
    try:
        value = int(raw[-1])
    except ValueError:
        raise HttpError(400, f"query parameter {name}: expected an integer, got {raw[-1][:64]!r}") from None
    # Unbounded sides still end at int64 (the database's integers): beyond is a 400, not a 500.
    lo = -(1 << 63) if lo is None else lo
    hi = (1 << 63) - 1 if hi is None else hi
    if not lo <= value <= hi:
        raise HttpError(400, f"query parameter {name}: must lie in [{lo}, {hi}], got {value}")
    return value


class BoundedHTTPServer(ThreadingHTTPServer):
    """A thread per connection, but at most max_connections of them, each with a deadline.

    A connection has request_timeout seconds from accept to deliver its request line and headers
    (and finish its TLS handshake); past that, serve_forever's loop (service_actions, every
    0.5 s) shuts its socket down and its thread ends. Each read or write also times out after
    request_timeout. A connection beyond max_connections is answered 503 and closed at once, on the
    accepting thread. So slow or silent clients hold at most max_connections threads, each for
    at most about request_timeout, and the HTTP side answers again once they are dropped."""

    daemon_threads = True
    block_on_close = False

    def __init__(
        self,
        address,
        handler,
        *,
        request_timeout: float = HTTP_REQUEST_TIMEOUT_S,
        max_connections: int = HTTP_MAX_CONNECTIONS,
        ssl_context: ssl.SSLContext | None = None,
    ):
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self._lock = threading.Lock()
        self._open = 0
        self._reading: dict[socket.socket, float] = {}
        """Connections that have not delivered their request yet -> their deadline."""
        self._lingering: dict[socket.socket, float] = {}
        """Refused connections, answered 503, until their client closes (or LINGER_S)."""
        super().__init__(address, handler)
        if ssl_context is not None:
            # The handshake runs on the connection's thread (Handler.setup), not on the accepting one.
            self.socket = ssl_context.wrap_socket(
                self.socket, server_side=True, do_handshake_on_connect=False
            )

    def process_request(self, request, client_address) -> None:
        with self._lock:
            full = self._open >= self.max_connections
            if not full:
                self._open += 1
                self._reading[request] = time.monotonic() + self.request_timeout
        if full:
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.shutdown_request(request)
            self._release()
            raise

    def _refuse(self, request) -> None:
        if isinstance(request, ssl.SSLSocket) or len(self._lingering) >= self.max_connections:
            self.shutdown_request(request)  # a TLS client would need a handshake first: just close
            return
        body = f"too many connections (--http-max-connections {self.max_connections}); retry later\n".encode()
        head = f"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
        try:
            request.settimeout(0)  # never block the accepting thread on a client that does not read
            request.send(head.encode() + body)
            request.shutdown(socket.SHUT_WR)
        except OSError:
            self.shutdown_request(request)
            return
        # Closed at once, a socket with the request unread would answer it with a reset, and the
        # client could lose the 503: service_actions reads and drops the rest, then closes it.
        self._lingering[request] = time.monotonic() + LINGER_S

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self) -> None:
        with self._lock:
            self._open -= 1

    def request_received(self, request) -> None:
        """The handler has the whole request: its deadline no longer applies."""
        with self._lock:
            self._reading.pop(request, None)

    def shutdown_request(self, request) -> None:
        with self._lock:  # under the lock: service_actions never shuts down a socket closed meanwhile
            self._reading.pop(request, None)
        super().shutdown_request(request)

    def service_actions(self) -> None:
        now = time.monotonic()
        for s, deadline in list(self._lingering.items()):  # only the serving thread touches these
            done = deadline <= now
            try:
                for _ in range(16):  # a bounded read: a client that keeps sending does not hold this thread
                    if not s.recv(65536):
                        done = True  # the client closed its side
                        break
            except BlockingIOError:
                pass
            except OSError:
                done = True
            if done:
                del self._lingering[s]
                super().shutdown_request(s)
        with self._lock:
            late = [s for s, deadline in self._reading.items() if deadline <= now]
            for s in late:
                del self._reading[s]
                with contextlib.suppress(OSError):
                    # The handler's read returns; its thread ends. (socket.socket's shutdown: a TLS
                    # socket's own would drop its TLS state under the thread reading it.)
                    socket.socket.shutdown(s, socket.SHUT_RDWR)

    def handle_error(self, request, client_address) -> None:
        # A client that hung up, timed out or failed its TLS handshake: no traceback on stderr.
        log.debug("http connection from %s failed: %r", client_address, sys.exc_info()[1])


class _Handler(BaseHTTPRequestHandler):
    """A connection's requests (HttpSide makes a subclass with its `side` and `timeout`)."""

    side: HttpSide
    timeout: float  # each read and write on the connection

    def setup(self):
        self.request.settimeout(self.timeout)
        if isinstance(self.request, ssl.SSLSocket):
            self.request.do_handshake()
        super().setup()

    def parse_request(self):
        ok = super().parse_request()
        self.server.request_received(self.request)
        return ok

    def log_message(self, *args):  # access logs would drown the server log
        pass

    def do_GET(self):
        url = urlparse(self.path)
        path = url.path
        parts = [unquote(p) for p in path.strip("/").split("/")] if path != "/" else []
        try:
            if parts[:1] == ["jobs"] and len(parts) == 2 and NAME_RE.fullmatch(parts[1]):
                return self._send(200, page.job_html(parts[1]), "text/html; charset=utf-8")
            if path in ("/", "/index.html"):
                return self._send(200, page.index_html(), "text/html; charset=utf-8")
            if path == "/healthz":
                ok = self.side.health_state()
                return self._send(200 if ok else 503, b"ok\n" if ok else b"shutting down\n", "text/plain")
            # Per-job JSON takes that job's reader token; everything spanning jobs needs a '*' token.
            job = parts[2] if parts[:2] == ["api", "jobs"] and len(parts) > 2 else "*"
            if self.side.auth is not None and self.side.auth.enabled:
                try:
                    self.side.auth.check(self.headers.get("Authorization"), job, "reader")
                except MixerError as e:
                    raise HttpError(
                        401 if e.code == grpc.StatusCode.UNAUTHENTICATED else 403, e.message
                    ) from None
            if path == "/metrics":
                return self._send(200, generate_latest(self.side.metrics.registry), CONTENT_TYPE_LATEST)
            if parts[:2] == ["api", "jobs"]:
                return self._json(200, self._api(parts[2:], parse_qs(url.query)))
            raise HttpError(404, f"no such path {path!r}; try /, /jobs/NAME, /metrics, /healthz, /api/jobs")
        except HttpError as e:
            return self._json(e.code, {"error": e.message})
        except SQLAlchemyError as e:
            return self._json(
                503, {"error": f"the database is unavailable ({type(e).__name__}); retry later"}
            )
        except Exception as e:  # noqa: BLE001 - a bug answers 500 with its name; the server stays up
            return self._json(500, {"error": f"internal error ({type(e).__name__}: {e})"})

    def _api(self, rest: list[str], query: dict) -> dict:
        d = self.side.data
        if not rest:
            return {"jobs": d.jobs()}
        name = rest[0]
        if len(rest) == 1:
            return d.job(name)
        if rest[1:] == ["versions"]:
            return d.versions(
                name, _int_arg(query, "after", None, lo=-1), _int_arg(query, "tail", 500, lo=1, hi=MAX_TAIL)
            )
        if len(rest) == 3 and rest[1] == "versions":
            return d.version(name, _int_arg({"version": [rest[2]]}, "version", 0, lo=0))
        if rest[1:] == ["loss"]:
            return d.loss(
                name,
                _int_arg(query, "after_seq", None, lo=-1),
                _int_arg(query, "limit", 2000, lo=1, hi=MAX_TAIL),
            )
        raise HttpError(
            404, f"no such path {self.path!r}; try /api/jobs/{name}/versions or /api/jobs/{name}/loss"
        )

    def _json(self, code, obj):
        self._send(code, json.dumps(obj, allow_nan=False).encode(), "application/json", no_store=True)

    def _send(self, code, body, ctype, no_store=False):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if no_store:  # live data: a cached copy would freeze the page's charts
            self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)


class HttpSide:
    """A small threaded HTTP server next to the gRPC port (HTTPS when ssl_context is given)."""

    def __init__(
        self,
        host: str,
        port: int,
        metrics,
        runtimes,
        health_state,
        auth=None,
        *,
        request_timeout: float = HTTP_REQUEST_TIMEOUT_S,
        max_connections: int = HTTP_MAX_CONNECTIONS,
        ssl_context: ssl.SSLContext | None = None,
    ):
        self.auth = auth
        self.metrics = metrics
        self.runtimes = runtimes
        self.health_state = health_state
        self.data = JobData(runtimes)
        handler = type("Handler", (_Handler,), {"side": self, "timeout": request_timeout})
        self.httpd = BoundedHTTPServer(
            (host, port),
            handler,
            request_timeout=request_timeout,
            max_connections=max_connections,
            ssl_context=ssl_context,
        )
        self.scheme = "https" if ssl_context is not None else "http"
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="mixer-http", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
