"""The store's durability setting: chosen in ServeConfig, read back from the database, shown in
the start-up line and as `mixer_store_info`; real servers in subprocesses, real SQLite and PostgreSQL."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from mixer.bench.launch import ServerProcess
from mixer.client import MixerClient
from mixer.config import ConfigError, check
from mixer.server.app import ServeConfig
from mixer.signals import Report
from mixer.store import Store
from mixer.store.repository import SQLITE_SYNCHRONOUS
from tests.reliability.configured import ConfiguredServer, metric_lines

SPEC = {"name": "durable", "domains": ["a", "b"], "strategy": "odm"}


def store_info(srv: ServerProcess) -> dict[str, str]:
    found = metric_lines(srv, "mixer_store_info")
    assert len(found) == 1 and found[0][1] == 1.0, f"expected one mixer_store_info series at 1, got {found}"
    return found[0][0]


def report(step: int) -> Report:
    return Report(
        step=step, source="w", domain_loss_sum=np.array([1.0, 2.0]), domain_token_count=np.array([4.0, 4.0])
    )


@pytest.fixture
def started(tmp_path):
    servers: list[ServerProcess] = []
    yield servers
    for srv in servers:
        srv.kill()


@pytest.mark.parametrize("synchronous", SQLITE_SYNCHRONOUS)
def test_the_sqlite_setting_is_applied_and_shown(tmp_path, started, synchronous):
    srv = ConfiguredServer(str(tmp_path / "mixer.db"), tmp_path, sqlite_synchronous=synchronous)
    started.append(srv)
    srv.start()
    info = store_info(srv)
    assert info == {"backend": "sqlite", "journal_mode": "wal", "synchronous": synchronous}
    line = next(ln for ln in srv.log().splitlines() if ln.startswith("mixer serving on"))
    assert f"synchronous={synchronous}" in line and "journal_mode=wal" in line, line
    with MixerClient(srv.address) as c:
        c.create_job(SPEC)
        for step in range(5):
            c.report("durable", report(step))
        assert c.get_job("durable").report_count == 5


def test_the_default_is_normal(server):
    assert ServeConfig().sqlite_synchronous == "normal"
    assert store_info(server)["synchronous"] == "normal"


@pytest.mark.postgres
def test_postgres_shows_synchronous_commit(server_factory, pg_url):
    import psycopg

    with psycopg.connect(pg_url) as conn:
        expected = conn.execute("SHOW synchronous_commit").fetchone()[0]
    srv = server_factory(pg_url)
    info = store_info(srv)
    assert info["backend"] == "postgresql" and info["synchronous_commit"] == expected, info
    assert f"synchronous_commit={expected}" in srv.log()


def test_every_pooled_sqlite_connection_gets_the_setting(tmp_path):
    store = Store(str(tmp_path / "pool.db"), sqlite_synchronous="full")
    seen: list[int] = []
    both = threading.Barrier(2)

    def probe():
        with store.engine.connect() as conn:
            both.wait(10)  # two connections open at once: two distinct ones from the pool
            seen.append(conn.exec_driver_sql("PRAGMA synchronous").scalar())

    threads = [threading.Thread(target=probe) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    store.close()
    assert seen == [2, 2]  # FULL


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"sqlite_synchronous": "extra"}, "sqlite_synchronous (--sqlite-synchronous): 'extra' is not one of normal, full"),
        ({"sqlite_synchronous": "FULL"}, "sqlite_synchronous (--sqlite-synchronous): 'FULL' is not one of normal, full"),
        (
            {"sqlite_synchronous": "full", "db": "postgresql://u@h/db"},
            "--sqlite-synchronous applies to SQLite only",
        ),
    ],
)
def test_a_bad_setting_is_refused_by_name(fields, message):
    with pytest.raises(ConfigError) as err:
        check(ServeConfig(**fields))
    assert message in str(err.value)


def test_the_store_refuses_an_unknown_setting():
    with pytest.raises(ValueError, match="sqlite_synchronous: must be one of normal, full, got 'off'"):
        Store("sqlite://", sqlite_synchronous="off")
