"""Faults with real processes: the database goes away, the server is killed mid-commit."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from mixer.client import MixerClient
from mixer.replay import verify
from mixer.reporter import Reporter
from mixer.signals import Report
from mixer.store import Store
from tests.reliability.pgcluster import PgCluster

SPEC = {"name": "faults", "domains": ["a", "b", "c"], "strategy": "odm", "cadence": {"update_every": 5, "snapshot_every": 3}}


def report(step: int, source: str) -> Report:
    rng = np.random.default_rng(step)
    return Report(
        step=step,
        source=source,
        domain_loss_sum=rng.uniform(1, 4, 3) * 16,
        domain_token_count=np.full(3, 16.0),
        domain_sample_count=np.array([2, 2, 2]),
        sample_loss=rng.uniform(1, 4, 6).astype(np.float32),
        sample_domain=np.array([0, 0, 1, 1, 2, 2], dtype=np.int32),
    )


def stream(rep: Reporter, steps: int, pace: float) -> None:
    for s in range(steps):
        rep.submit(report(s, rep.source))
        time.sleep(pace)


@pytest.mark.slow
def test_database_outage_is_unavailable_and_nothing_is_lost(server_factory):
    pg = PgCluster()
    pg.start()
    try:
        pg.create_database()
        srv = server_factory(pg.url)
        with MixerClient(srv.address, timeout=5) as c:
            c.create_job(SPEC)
        rep = Reporter(srv.address, "faults", "rank0", max_backoff=0.5).start()
        t = threading.Thread(target=stream, args=(rep, 600, 0.02))
        t.start()
        while rep.acked < 100:
            time.sleep(0.01)
        pg.stop()
        outage_started = time.monotonic()
        # While the database is away the service answers UNAVAILABLE instead of crashing.
        with MixerClient(srv.address, timeout=5) as c:
            deadline = time.monotonic() + 10
            seen = None
            while time.monotonic() < deadline:
                try:
                    c.report("faults", report(10_000, "probe"))
                except grpc.RpcError as e:
                    seen = e.code()
                    break
            assert seen == grpc.StatusCode.UNAVAILABLE, seen
        acked_during = rep.acked
        time.sleep(max(0.0, 10 - (time.monotonic() - outage_started)))
        assert srv.proc.poll() is None, "the server died with its database:\n" + srv.log()
        assert rep.acked - acked_during <= 1, "reports were acknowledged while the database was down"
        pg.start()
        t.join(60)
        assert rep.close(timeout=120), f"{rep.pending} reports never arrived; last error {rep.last_error}"
        store = Store(pg.url)
        rec = store.get_job("faults")
        steps = [s.step for s in store.signals(rec.id) if s.source == "rank0"]
        assert sorted(steps) == list(range(600))
        seqs = [s.seq for s in store.signals(rec.id)]
        assert seqs == list(range(len(seqs)))
        result = verify(store, "faults")
        assert result.ok, result.first_divergence
        store.close()
    finally:
        pg.destroy()


@pytest.mark.slow
@pytest.mark.parametrize("round_", range(3))
def test_sigkill_during_group_commits_loses_and_doubles_nothing(server_factory, sqlite_url, round_):
    srv = server_factory(sqlite_url)
    with MixerClient(srv.address) as c:
        c.create_job(SPEC)
    reps = [Reporter(srv.address, "faults", f"rank{i}", max_backoff=0.3).start() for i in range(4)]
    for r in reps:
        for s in range(400):
            r.submit(report(s, r.source))  # no pacing: commits are in flight all the time
    target = 150 + 200 * round_
    deadline = time.monotonic() + 60
    while sum(r.acked for r in reps) < target and time.monotonic() < deadline:
        time.sleep(0.001)
    srv.kill()
    acked = {r.source: r.acked for r in reps}
    srv.start()
    for r in reps:
        assert r.close(timeout=120), r.pending
    store = Store(sqlite_url)
    rec = store.get_job("faults")
    keys = [(s.source, s.step) for s in store.signals(rec.id)]
    assert len(keys) == len(set(keys)) == 1600
    assert sum(acked.values()) < 1600, "the kill came after everything was committed"
    assert verify(store, "faults").ok
    store.close()


def test_finished_job_refuses_reports_and_leaves_metrics(server):
    import urllib.request

    with MixerClient(server.address) as c:
        c.create_job(SPEC)
        c.report("faults", report(0, "w"))
        job = c.finish_job("faults")
        assert job.status == "finished"
        with pytest.raises(grpc.RpcError) as err:
            c.report("faults", report(1, "w"))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "finished" in err.value.details()
        assert c.get_weights("faults").version == 0  # still readable
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/metrics", timeout=5).read().decode()
    assert 'job="faults"' not in text
