"""Shared fixtures: real `mixer serve` subprocesses on SQLite or a fresh PostgreSQL database."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

PG_ADMIN_URL = os.environ.get("MIXER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A real `mixer serve` in a subprocess; restartable on the same database and ports."""

    def __init__(self, db: str, workdir: Path, extra_args: list[str] | None = None):
        self.db = db
        self.extra_args = extra_args or []
        self.port = free_port()
        self.http_port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / f"serve-{self.port}.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerProcess:
        cmd = [sys.executable, "-m", "mixer.cli", "serve", "--db", self.db, "--port", str(self.port), "--http-port", str(self.http_port), *self.extra_args]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        self.wait_serving(timeout)
        return self

    def wait_serving(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"mixer serve exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    time.sleep(0.1)
        raise TimeoutError(f"mixer serve not serving after {timeout}s:\n{self.log_path.read_text()}")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 20.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text()


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return str(tmp_path / "mixer.db")


def _pg_admin():
    import psycopg

    return psycopg.connect(PG_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)


@pytest.fixture
def pg_url():
    """A fresh PostgreSQL database on the shared server, dropped afterwards."""
    name = f"mixer_test_{uuid.uuid4().hex[:12]}"
    with _pg_admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    with _pg_admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "mixer.db")
    return request.getfixturevalue("pg_url")


@pytest.fixture
def server_factory(tmp_path):
    started: list[ServerProcess] = []

    def make(db: str, *extra_args: str) -> ServerProcess:
        srv = ServerProcess(db, tmp_path, list(extra_args))
        started.append(srv)
        return srv.start()

    yield make
    for srv in started:
        srv.kill()


@pytest.fixture
def server(server_factory, sqlite_url) -> ServerProcess:
    return server_factory(sqlite_url)
