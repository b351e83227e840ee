"""Shared fixtures: real `mixer serve` subprocesses on SQLite or a fresh PostgreSQL database."""

from __future__ import annotations

import os
import uuid

import pytest

from mixer.server.launch import ServerProcess

PG_ADMIN_URL = os.environ.get("MIXER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


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
