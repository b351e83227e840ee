"""Start a real `mixer serve` in a subprocess (the demo, benchmarks and tests use it), or with
`workers=N` a `mixer serve --workers N` (its parent and N worker processes)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mixer.client import FAST_RECONNECT


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """CPU time (user + system) a process, or one of its threads, has used so far (0.0 once it is
    gone): a machine shared with other work stretches the wall clock, far less the CPU a report costs."""
    where = f"/proc/{pid}" if thread is None else f"/proc/{pid}/task/{thread}"
    try:
        fields = Path(f"{where}/stat").read_text().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> int:
    """The first of n consecutive ports that are free now."""
    for _ in range(100):
        base = free_port()
        if base + n > 65535:
            continue
        try:
            with contextlib.ExitStack() as held:
                for p in range(base, base + n):
                    s = held.enter_context(socket.socket())
                    s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no {n} consecutive free ports found")


class ServerProcess:
    """A `mixer serve` subprocess; restartable on the same database and ports."""

    def __init__(self, db: str, workdir: Path, extra_args: list[str] | None = None, *, workers: int = 1):
        self.db = db
        self.workers = workers
        self.extra_args = [*(extra_args or []), *(["--workers", str(workers)] if workers > 1 else [])]
        # One block of free ports, so the gRPC ports (the shared one and each worker's own, port+1+i)
        # and the HTTP ports (http_port+i) can never be drawn twice.
        grpc_ports = workers + 1 if workers > 1 else 1
        self.port = free_ports(grpc_ports + workers)
        self.http_port = self.port + grpc_ports
        self.workdir = Path(workdir)
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / f"serve-{self.port}.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def worker_addresses(self) -> list[str]:
        """Each worker's own address (what it advertises), with --workers; else the one address."""
        if self.workers == 1:
            return [self.address]
        return [f"127.0.0.1:{self.port + 1 + i}" for i in range(self.workers)]

    def worker_pids(self) -> dict[str, int]:
        """The newest process of each worker, by its own address (from the parent's log)."""
        found = re.findall(r"mixer worker \d+: pid (\d+), port \d+ and (\S+) ", self.log())
        return {address: int(pid) for pid, address in found}

    def start(self, timeout: float = 60.0) -> ServerProcess:
        cmd = [
            sys.executable,
            "-m",
            "mixer.cli",
            "serve",
            "--db",
            self.db,
            "--port",
            str(self.port),
            "--http-port",
            str(self.http_port),
            *self.extra_args,
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        self.wait_serving(timeout)
        return self

    def wait_serving(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        if "--tls-cert" in self.extra_args:
            # Without the client's CA at hand, the log line says when a TLS server is up.
            start = len(self.log())
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"mixer serve exited with {self.proc.returncode}:\n{self.log()}")
                if "mixer serving on" in self.log()[start:]:
                    return
                time.sleep(0.05)
            self.kill()
            raise TimeoutError(f"mixer serve not serving after {timeout}s:\n{self.log()}")
        for address in self.worker_addresses:
            if not self._healthy(address, deadline):
                self.kill()
                raise TimeoutError(f"mixer serve not serving at {address} after {timeout}s:\n{self.log()}")

    def _healthy(self, address: str, deadline: float) -> bool:
        with grpc.insecure_channel(address, options=FAST_RECONNECT) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"mixer serve exited with {self.proc.returncode}:\n{self.log()}")
                try:
                    if (
                        stub.Check(
                            health_pb2.HealthCheckRequest(service=""), timeout=1, wait_for_ready=True
                        ).status
                        == health_pb2.HealthCheckResponse.SERVING
                    ):
                        return True
                except grpc.RpcError:
                    time.sleep(0.05)
        return False

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""
