"""Shared fixtures: real `mixer serve` subprocesses on SQLite or a fresh PostgreSQL database."""

from __future__ import annotations

import os
import uuid

import pytest

from mixer.bench.launch import ServerProcess

PG_ADMIN_URL = os.environ.get("MIXER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return str(tmp_path / "mixer.db")


def _pg_admin():
    import psycopg

    return psycopg.connect(PG_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)


def _create_pg_database() -> str:
    name = f"mixer_test_{uuid.uuid4().hex[:12]}"
    with _pg_admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"


def _drop_pg_database(url: str) -> None:
    with _pg_admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')


@pytest.fixture
def pg_url():
    """A fresh PostgreSQL database on the shared server, dropped afterwards."""
    url = _create_pg_database()
    yield url
    _drop_pg_database(url)


BOTH_DATABASES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BOTH_DATABASES)
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "mixer.db")
    return request.getfixturevalue("pg_url")


@pytest.fixture(scope="module", params=BOTH_DATABASES)
def module_db_url(request, tmp_path_factory):
    """db_url for a module's shared server: a SQLite file, then a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield str(tmp_path_factory.mktemp("db") / "mixer.db")
        return
    url = _create_pg_database()
    yield url
    _drop_pg_database(url)


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


@pytest.fixture
def server_on_each_db(server_factory, db_url) -> ServerProcess:
    """A server on SQLite, and (a second run of the test) on a fresh PostgreSQL database."""
    return server_factory(db_url)
