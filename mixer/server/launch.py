"""Start a real `mixer serve` in a subprocess (the demo, benchmarks and tests use it)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mixer.client import FAST_RECONNECT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A `mixer serve` subprocess; restartable on the same database and ports."""

    def __init__(self, db: str, workdir: Path, extra_args: list[str] | None = None):
        self.db = db
        self.extra_args = extra_args or []
        self.port = free_port()
        self.http_port = free_port()
        self.workdir = Path(workdir)
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / f"serve-{self.port}.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> ServerProcess:
        cmd = [sys.executable, "-m", "mixer.cli", "serve", "--db", self.db, "--port", str(self.port), "--http-port", str(self.http_port), *self.extra_args]
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
        with grpc.insecure_channel(self.address, options=FAST_RECONNECT) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"mixer serve exited with {self.proc.returncode}:\n{self.log()}")
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1, wait_for_ready=True).status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    time.sleep(0.05)
        self.kill()
        raise TimeoutError(f"mixer serve not serving after {timeout}s:\n{self.log()}")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""
