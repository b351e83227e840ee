"""The blocking client answers with the core types; the background reporter never blocks, spills
beyond its bound, delivers after reconnect."""

from __future__ import annotations

import itertools
import time

import numpy as np

from mixer.client import MixerClient
from mixer.reporter import Reporter
from mixer.signals import Report
from mixer.store import Store
from mixer.types import JobInfo, ReportAck, ServedVersion


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


def test_the_client_answers_with_core_types_that_agree_with_the_store(server):
    spec = {"name": "typed", "domains": ["a", "b"], "strategy": "odm", "cadence": {"update_every": 5}}
    with MixerClient(server.address) as c:
        created, is_new = c.create_job(spec)
        acks = [c.report("typed", report(s)) for s in range(12)]
        again = c.report("typed", report(3))
        job, listed, newest = c.get_job("typed"), c.list_versions("typed"), c.get_weights("typed")
        at_step = c.get_weights("typed", step=7)
        ack_latest = c.get_weights("typed", version=again.latest.version)
        watched = list(itertools.islice(c.watch("typed", after=-1, timeout=30), len(listed)))
        finished = c.finish_job("typed")
        (in_list,) = [j for j in c.list_jobs() if j.name == "typed"]
    store = Store(server.db)
    rec = store.get_job("typed")
    stored, logged = store.versions(rec.id), list(store.signals(rec.id))
    store.close()

    assert all(isinstance(j, JobInfo) for j in (created, job, finished, in_list)) and is_new
    assert (created.name, created.spec_json, created.fingerprint, created.created_at, created.status) == (
        rec.name, rec.spec_json, rec.fingerprint, rec.created_at, "active"
    )
    assert created.domains == tuple(spec["domains"]) and created.strategy == spec["strategy"]
    assert (job.report_count, job.max_step, job.latest_version) == (len(logged), 11, stored[-1][0].version)
    assert finished.status == in_list.status == "finished"

    assert all(isinstance(a, ReportAck) for a in (*acks, again))
    got = [(a.log_seq, a.step, a.seq, a.source) for a in acks]
    assert got == [(r.seq, r.step, r.source_seq, r.source) for r in logged]
    assert not any(a.duplicate for a in acks) and again.duplicate and again.latest == ack_latest

    assert len(listed) == len(stored) > 1 and all(isinstance(v, ServedVersion) for v in listed)
    for v, (want, committed) in zip(listed, stored, strict=True):
        assert v.same_as(want) and (v.trigger_step, v.created_at) == (want.trigger_step, committed)
        assert (v.job, v.domains, v.weights.dtype) == ("typed", tuple(spec["domains"]), np.float64)
    assert watched == listed
    # The newest versions are answered from the server's memory, whose commit time is taken apart
    # from the database row's: compare what a worker applies.
    in_force = max((v for v in listed if v.effective_step <= 7), key=lambda v: v.version)
    assert newest.same_as(listed[-1]) and at_step.same_as(in_force)
    assert (newest.trigger_step, at_step.trigger_step) == (listed[-1].trigger_step, in_force.trigger_step)
