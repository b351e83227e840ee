"""Where jobs go when several servers share a database: rendezvous placement over the live servers
(heartbeat rows), and the schema migrated once when servers start together on a fresh database."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import select, text, update

from mixer.store import Store
from mixer.store.models import LeaseRow, ServerRow
from mixer.store.repository import MIGRATIONS, rendezvous_order, rendezvous_weight

SERVERS = ["10.0.0.1:50052", "10.0.0.1:50053", "10.0.0.1:50054"]
KEYS = [f"job-{i}" for i in range(3000)]
TTL = 2.0


def test_rendezvous_spreads_jobs_evenly():
    firsts = Counter(rendezvous_order(k, SERVERS)[0] for k in KEYS)
    share = len(KEYS) / len(SERVERS)
    # Binomial(3000, 1/3): one standard deviation is 26 jobs; 4 of them is 103.
    assert set(firsts) == set(SERVERS) and all(abs(n - share) < 4 * 26 for n in firsts.values()), firsts


def test_rendezvous_moves_only_the_jobs_of_a_server_that_leaves():
    for gone in SERVERS:
        rest = [s for s in SERVERS if s != gone]
        for k in KEYS:
            before = rendezvous_order(k, SERVERS)
            after = rendezvous_order(k, rest)
            # Everyone keeps their jobs; the leaver's go to the next server in each job's own order.
            assert after == [s for s in before if s != gone]


def test_rendezvous_order_is_by_weight_and_ignores_the_listing_order():
    k = "some-job"
    order = rendezvous_order(k, SERVERS)
    assert order == rendezvous_order(k, list(reversed(SERVERS))) == rendezvous_order(k, SERVERS + SERVERS[:1])
    weights = [rendezvous_weight(s, k) for s in order]
    assert weights == sorted(weights, reverse=True) and all(0 <= w < 1 << 64 for w in weights)


def _beat(store: Store, server_id: str, ttl: float = TTL) -> None:
    assert store.heartbeat(server_id, f"addr-of-{server_id}", ttl, []) == []


@pytest.mark.postgres
def test_a_free_job_is_taken_only_by_its_first_live_server(pg_url):
    store = Store(pg_url)
    try:
        rec, _ = store.create_job("placed", "{}", "f" * 64, "static")
        first, second, third = rendezvous_order("placed", SERVERS)
        for sid in SERVERS:
            _beat(store, sid)
        assert store.live_servers() == {sid: f"addr-of-{sid}" for sid in SERVERS}

        # Another live server, asked first, sends the caller to the job's first server and takes nothing.
        assert store.acquire_lease(rec.id, second, f"addr-of-{second}", TTL, place="placed") == (
            False,
            f"addr-of-{first}",
        )
        with store.engine.connect() as conn:
            assert conn.scalar(select(LeaseRow.owner).where(LeaseRow.job_id == rec.id)) is None
        assert store.placement("placed", third, f"addr-of-{third}") == (first, f"addr-of-{first}")
        assert store.acquire_lease(rec.id, first, f"addr-of-{first}", TTL, place="placed") == (
            True,
            f"addr-of-{first}",
        )
        # Held: the others name the holder, whatever the placement says.
        assert store.acquire_lease(rec.id, third, f"addr-of-{third}", TTL, place="placed") == (
            False,
            f"addr-of-{first}",
        )

        # The first server dies: its heartbeat and its lease run out; the second in order takes the
        # job, the third sends callers there.
        with store.engine.begin() as conn:
            conn.execute(update(ServerRow).where(ServerRow.server_id == first).values(expires_at=0.0))
            conn.execute(update(LeaseRow).where(LeaseRow.job_id == rec.id).values(expires_at=0.0))
        assert first not in store.live_servers()
        assert store.acquire_lease(rec.id, third, f"addr-of-{third}", TTL, place="placed") == (
            False,
            f"addr-of-{second}",
        )
        assert store.acquire_lease(rec.id, second, f"addr-of-{second}", TTL, place="placed") == (
            True,
            f"addr-of-{second}",
        )

        # A graceful stop hands the job over at once and leaves the live set.
        store.release_leases(second)
        assert second not in store.live_servers()
        assert store.acquire_lease(rec.id, third, f"addr-of-{third}", TTL, place="placed") == (
            True,
            f"addr-of-{third}",
        )
        # The heartbeat renews the leases it is given and names those it lost.
        assert store.heartbeat(second, f"addr-of-{second}", TTL, [rec.id]) == [rec.id]
        assert store.heartbeat(third, f"addr-of-{third}", TTL, [rec.id]) == []
        # A heartbeat row that ran out long ago (a server killed and never restarted) is deleted.
        with store.engine.begin() as conn:
            conn.execute(update(ServerRow).where(ServerRow.server_id == first).values(expires_at=1.0))
        _beat(store, third)
        with store.engine.connect() as conn:
            assert set(conn.execute(select(ServerRow.server_id)).scalars()) == {second, third}
    finally:
        store.close()


MIGRATORS = 4
_MIGRATE = """
import sys, time
from mixer.store import Store
start = float(sys.argv[2])
while time.time() < start:
    pass
Store(sys.argv[1]).close()
"""


@pytest.mark.postgres
@pytest.mark.slow
def test_servers_starting_at_once_migrate_a_fresh_database_once(pg_url):
    """4 processes open a fresh database at the same instant: each runs the migration; the advisory
    lock lets one migrate and the others find the schema current; all succeed."""
    start = time.time() + 4.0  # every process imported and spinning before the instant
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _MIGRATE, pg_url, repr(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(MIGRATORS)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outputs)
    assert time.time() > start
    head = ScriptDirectory(str(MIGRATIONS)).get_current_head()
    store = Store(pg_url, migrate=False)
    try:
        with store.engine.connect() as conn:
            assert conn.execute(text("select version_num from alembic_version")).scalars().all() == [head]
            tables = set(
                conn.execute(text("select tablename from pg_tables where schemaname = 'public'")).scalars()
            )
        assert {"jobs", "signals", "versions", "snapshots", "tokens", "leases", "servers"} <= tables
    finally:
        store.close()
