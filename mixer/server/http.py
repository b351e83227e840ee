"""The HTTP side: Prometheus text at /metrics, health at /healthz, JSON under /api/."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import grpc
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mixer.server.runtime import MixerError


def _job_json(rt) -> dict:
    cur = rt.engine.current
    return {
        "name": rt.job.name,
        "strategy": rt.spec.strategy.name,
        "domains": rt.spec.domain_names,
        "version": cur.version,
        "effective_step": cur.effective_step,
        "weights": cur.weights.tolist(),
        "loss": None if rt.last_loss is None else rt.last_loss.tolist(),
        "max_step": rt.engine.max_step,
        "reports": rt.report_count,
        "source_job": rt.job.source_job,
    }


class HttpSide:
    """A small threaded HTTP server next to the gRPC port."""

    def __init__(self, host: str, port: int, metrics, runtimes, health_state, auth=None):
        self.auth = auth
        self.metrics = metrics
        self.runtimes = runtimes
        self.health_state = health_state
        side = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # access logs would drown the server log
                pass

            def do_GET(self):
                path = urlparse(self.path).path
                if path != "/healthz" and side.auth is not None and side.auth.enabled:
                    # Per-job JSON takes that job's reader token; everything spanning jobs needs a '*' token.
                    job = unquote(path[len("/api/jobs/"):]) if path.startswith("/api/jobs/") else "*"
                    try:
                        side.auth.check(self.headers.get("Authorization"), job, "reader")
                    except MixerError as e:
                        code = 401 if e.code == grpc.StatusCode.UNAUTHENTICATED else 403
                        return self._json(code, {"error": e.message})
                if path == "/metrics":
                    return self._send(200, generate_latest(side.metrics.registry), CONTENT_TYPE_LATEST)
                if path == "/healthz":
                    ok = side.health_state()
                    return self._send(200 if ok else 503, b"ok\n" if ok else b"shutting down\n", "text/plain")
                if path == "/api/jobs":
                    jobs = [_job_json(rt) for rt in list(side.runtimes.jobs.values())]
                    return self._json(200, {"jobs": jobs})
                if path.startswith("/api/jobs/"):
                    name = unquote(path[len("/api/jobs/"):])
                    rt = side.runtimes.jobs.get(name)
                    if rt is None:
                        return self._json(404, {"error": f"job {name!r} is not loaded on this server"})
                    return self._json(200, _job_json(rt))
                return self._json(404, {"error": f"no such path {path!r}; try /metrics, /healthz, /api/jobs"})

            def _json(self, code, obj):
                self._send(code, json.dumps(obj).encode(), "application/json")

            def _send(self, code, body, ctype):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="mixer-http", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
