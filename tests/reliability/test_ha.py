"""High availability: two servers on one PostgreSQL, jobs owned through lease rows."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from mixer.client import MixerClient, Reporter
from mixer.replay import verify
from mixer.store import Store
from mixer.store.models import LeaseRow
from tests.reliability.test_faults import SPEC, report


def owner_of(db: str, job: str) -> str:
    from sqlalchemy import select

    store = Store(db, migrate=False)
    try:
        job_id = store.get_job(job).id
        with store.engine.connect() as conn:
            return conn.scalar(select(LeaseRow.address).where(LeaseRow.job_id == job_id))
    finally:
        store.close()


@pytest.mark.postgres
@pytest.mark.slow
def test_killing_the_owner_hands_the_job_over(server_factory, pg_url):
    a = server_factory(pg_url, "--ha", "--lease-ttl", "3")
    b = server_factory(pg_url, "--ha", "--lease-ttl", "3")
    with MixerClient(a.address) as c:
        c.create_job(SPEC)
    assert owner_of(pg_url, "faults") == a.address
    # The other server does not serve the job while the owner lives; it names the owner.
    with MixerClient(b.address, timeout=5) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.get_weights("faults")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and a.address in err.value.details()

    rep = Reporter(f"{a.address},{b.address}", "faults", "rank0", max_backoff=0.3).start()

    def stream():
        for s in range(800):
            rep.submit(report(s, "rank0"))
            time.sleep(0.005)

    t = threading.Thread(target=stream)
    t.start()
    while rep.acked < 200:
        time.sleep(0.01)
    a.kill()
    killed = time.monotonic()
    acked_at_kill = rep.acked
    while rep.acked < acked_at_kill + 20 and time.monotonic() - killed < 30:
        time.sleep(0.02)
    handover = time.monotonic() - killed
    assert handover < 10, f"the job took {handover:.1f}s to move"
    assert owner_of(pg_url, "faults") == b.address
    t.join(60)
    assert rep.close(timeout=60), rep.pending

    store = Store(pg_url)
    rec = store.get_job("faults")
    keys = [(s.source, s.step) for s in store.signals(rec.id)]
    assert len(keys) == len(set(keys)) == 800
    seqs = [s.seq for s in store.signals(rec.id)]
    assert seqs == list(range(800))
    versions = [v.version for v, _ in store.versions(rec.id)]
    assert versions == list(range(len(versions))), "a version was lost or duplicated"
    assert verify(store, "faults").ok
    store.close()
    # The survivor serves everything; restarting the old owner does not take the job back.
    a.start()
    with MixerClient(b.address) as c:
        assert c.get_job("faults").report_count == 800
    assert owner_of(pg_url, "faults") == b.address
    print(f"handover after {handover:.2f}s")


def test_ha_needs_postgres(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "mixer.cli", "serve", "--db", str(tmp_path / "x.db"), "--ha"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "PostgreSQL" in out.stderr
