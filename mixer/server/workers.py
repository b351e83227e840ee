"""`mixer serve --workers N`: N server processes on one host, sharing a port and a PostgreSQL database.

The parent starts N workers (`python -m mixer.server.workers`, the configuration on stdin, never
on the command line where `ps` shows a database password) and supervises them; it serves nothing
itself. Every worker binds the shared --port with SO_REUSEPORT, so the kernel spreads new
connections over them, and its own port (port+1+i), which it advertises in the lease rows of the
jobs it owns: a worker that gets a call about a job another one owns answers with that owner's
address (errors.py), and the clients connect there. Worker i serves HTTP (/metrics, /api) on
http_port+i, so each can be scraped on its own.

Choices of ours:
- A worker that dies unexpectedly is started again (same ports, same server id, so it may take its
  own leases back at once); more than `MAX_RESTARTS` deaths within `RESTART_WINDOW_S` stop all the
  workers and the parent exits 1 (something is wrong that restarting does not fix).
- SIGTERM and SIGINT are forwarded to every worker; each stops gracefully (--grace-seconds) and
  hands its leases over; the parent exits 0 once all have, 1 if one failed. A worker still running
  `STOP_MARGIN_S` after its grace is killed.
- The parent migrates the database's schema before it starts the workers, so that a failing
  migration stops everything once, with its error, instead of every worker in turn (workers that
  migrate at once do not race: `Store.migrate` holds an advisory lock).
- A worker ends itself when the parent dies (PR_SET_PDEATHSIG), so no orphan keeps the port.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import json
import logging
import signal
import socket
import subprocess
import sys
import time
from collections import deque

from mixer.server.app import ServeConfig
from mixer.store import Store

log = logging.getLogger("mixer.server")

MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
STOP_MARGIN_S = 10.0
POLL_S = 0.2


def _probe(host: str, port: int, what: str) -> None:
    """Refuse a port that another process holds, before any worker binds it with SO_REUSEPORT (which
    would otherwise join another server's group on that port instead of failing)."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host.strip("[]"), port))
        except OSError as e:
            raise SystemExit(
                f"cannot bind {host}:{port} ({what}): {e.strerror or e}; is another server running there?"
            ) from None


class Supervisor:
    """The parent of --workers: starts the workers, restarts one that dies, stops them all."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.configs = [cfg.worker(i) for i in range(cfg.workers)]
        self.procs: list[subprocess.Popen | None] = [None] * cfg.workers
        self.deaths: deque[float] = deque()
        self.stopping = False

    def start(self, i: int) -> None:
        w = self.configs[i]
        proc = subprocess.Popen([sys.executable, "-m", "mixer.server.workers"], stdin=subprocess.PIPE)
        proc.stdin.write(json.dumps(dataclasses.asdict(w)).encode())
        proc.stdin.close()
        self.procs[i] = proc
        print(
            f"mixer worker {i}: pid {proc.pid}, port {w.port} and {w.advertise} (server id {w.server_id}), http {w.http_port}",
            flush=True,
        )

    def stop(self, *_) -> None:
        """Forward a stop to every worker (a signal handler)."""
        self.stopping = True
        for p in self.procs:
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)

    def run(self) -> int:
        for i, w in enumerate(self.configs):
            _probe(w.host, w.private_port, f"worker {i}'s own port, --port + {1 + i}")
            if w.http_port:
                _probe(w.host, w.http_port, f"worker {i}'s HTTP port, --http-port + {i}")
        _probe(self.cfg.host, self.cfg.port, "--port")
        # The schema is brought up to date once, here: a failing migration is reported once.
        Store(self.cfg.db).close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.stop)
        for i in range(self.cfg.workers):
            self.start(i)
        while not self.stopping:
            time.sleep(POLL_S)
            for i, p in enumerate(self.procs):
                if self.stopping or p.poll() is None:
                    continue
                if not self._may_restart(i, p.returncode):
                    self.stop()
                    self._wait()
                    return 1
                self.start(i)
        return self._wait()

    def _may_restart(self, i: int, code: int) -> bool:
        now = time.monotonic()
        self.deaths.append(now)
        while self.deaths and self.deaths[0] < now - RESTART_WINDOW_S:
            self.deaths.popleft()
        if len(self.deaths) > MAX_RESTARTS:
            log.error(
                "worker %d exited with %d: %d workers died within %g s, stopping",
                i,
                code,
                len(self.deaths),
                RESTART_WINDOW_S,
            )
            return False
        log.warning("worker %d exited with %d; starting it again", i, code)
        return True

    def _wait(self) -> int:
        """Wait for every worker to end (killing one that outlives its grace); 0 if all ended cleanly."""
        deadline = time.monotonic() + self.cfg.grace_seconds + STOP_MARGIN_S
        failed = False
        for i, p in enumerate(self.procs):
            try:
                code = p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker %d still running %g s after its grace; killing it", i, STOP_MARGIN_S)
                p.kill()
                code = p.wait()
            failed |= code != 0
        return 1 if failed else 0


def serve_workers(cfg: ServeConfig) -> int:
    """Run `cfg.workers` server processes until SIGTERM/SIGINT; the exit status for the parent."""
    for warning in cfg.validate():
        log.warning("%s", warning)
    return Supervisor(cfg).run()


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _worker_main() -> None:
    """A worker: its configuration as JSON on stdin."""
    _die_with_parent()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("mixer").setLevel(logging.INFO)
    cfg = ServeConfig(**json.loads(sys.stdin.read()))
    from mixer.server.app import serve

    asyncio.run(serve(cfg))


if __name__ == "__main__":
    _worker_main()
