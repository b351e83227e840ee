"""The background reporter: never blocks, spills beyond its bound, delivers after reconnect."""

from __future__ import annotations

import time

import numpy as np

from mixer.client import MixerClient, Reporter
from mixer.signals import Report
from mixer.store import Store


def report(step: int) -> Report:
    return Report(
        step=step,
        source="rank0",
        domain_loss_sum=np.array([3.0, 6.0]),
        domain_token_count=np.array([1.0, 1.0]),
        domain_sample_count=np.array([1, 1]),
        sample_loss=np.array([3.0, 6.0], dtype=np.float32),
        sample_domain=np.array([0, 1], dtype=np.int32),
    )


def test_reports_spill_while_the_service_is_down_and_arrive_after(server, tmp_path):
    with MixerClient(server.address) as c:
        c.create_job({"name": "spill", "domains": ["a", "b"], "strategy": "odm", "cadence": {"update_every": 5}})
    rep = Reporter(server.address, "spill", "rank0", max_buffer=10, spill_dir=str(tmp_path), max_backoff=0.3).start()
    assert rep.connected.wait(30)
    first = rep.current
    assert first is not None and first.version == 0
    server.kill()
    t0 = time.perf_counter()
    for s in range(300):
        rep.submit(report(s))
    assert time.perf_counter() - t0 < 2.0, "submit() must not block while the service is down"
    assert rep.pending == 300
    assert list(tmp_path.glob("mixer-spill-*.bin")), "reports beyond the bound should spill to a file"
    assert rep.poll() is first and rep.poll() is None  # training goes on with the last weights
    server.start()
    assert rep.close(timeout=120), rep.pending
    assert not list(tmp_path.glob("mixer-spill-*.bin"))
    store = Store(server.db)
    rec = store.get_job("spill")
    assert sorted(s.step for s in store.signals(rec.id)) == list(range(300))
    store.close()


def test_resent_reports_are_duplicates_not_double_counted(server):
    with MixerClient(server.address) as c:
        c.create_job({"name": "dup", "domains": ["a", "b"], "strategy": "odm"})
        for s in range(20):
            c.report("dup", report(s))
    # A restarted worker replays steps it already reported, then goes on.
    rep = Reporter(server.address, "dup", "rank0").start()
    assert rep.connected.wait(30)
    assert rep.resume_from == (19, 0)
    for s in range(10, 30):
        rep.submit(report(s))
    assert rep.close(timeout=60)
    assert rep.duplicates == 10 and not rep.rejected
    with MixerClient(server.address) as c:
        assert c.get_job("dup").report_count == 30
