"""`mixer serve --workers N`: server processes sharing a port and a PostgreSQL database, jobs owned
through lease rows, clients sent on to a job's owner."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import grpc
import pytest
from sqlalchemy import update

from mixer.bench.launch import ServerProcess
from mixer.client import MAX_HOPS, MixerClient, RedirectError, owner_of
from mixer.config import ConfigError, check
from mixer.replay import verify
from mixer.reporter import Reporter
from mixer.server.app import ServeConfig
from mixer.store import Store
from mixer.store.models import LeaseRow
from mixer.store.repository import rendezvous_order
from tests.reliability.test_faults import report
from tests.reliability.test_ha import owner_of as lease_address
from tests.reliability.test_ha import wait_live

WORKERS = 3
JOBS = 12
REPORTERS_PER_JOB = 3
STEPS = 120
PACE_S = 0.03
"""Seconds between rounds of reports (one per reporter): ~4 s of streaming."""
KILL_AT = 0.3
"""Fraction of all reports acknowledged when one worker is killed."""
LEASE_TTL = 2.0


def spec(name: str) -> dict:
    return {
        "name": name,
        "domains": ["a", "b", "c"],
        "strategy": "odm",
        "cadence": {"update_every": 5, "snapshot_every": 3},
    }


@pytest.fixture
def workers(tmp_path):
    started: list[ServerProcess] = []

    def make(db: str, n: int) -> ServerProcess:
        srv = ServerProcess(db, tmp_path, ["--lease-ttl", str(LEASE_TTL)], workers=n)
        started.append(srv)
        return srv.start(timeout=90)

    yield make
    for srv in started:
        srv.kill()


def test_workers_need_postgres(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "mixer.cli", "serve", "--db", str(tmp_path / "x.db"), "--workers", "2"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0 and "--workers 2 needs a shared PostgreSQL database" in out.stderr, out.stderr


PG = "postgresql://postgres@127.0.0.1:5432/test"
BAD_WORKER_CONFIGS = [
    ({"workers": 0}, "workers (--workers): must be in [1, 256], got 0"),
    ({"workers": 3, "port": 65534}, "--port: with --workers 3, must be in [1, 65532]"),
    ({"workers": 2, "http_port": 65535}, "--http-port: with --workers 2, must be 0 or in [1, 65534]"),
    ({"workers": 2, "advertise": "node-1:50051"}, "--advertise: with --workers, give the host only"),
    (
        {"workers": 2, "host": "0.0.0.0", "insecure": True},
        "--host 0.0.0.0 with --workers: pass --advertise HOST",
    ),
]


@pytest.mark.parametrize(("fields", "message"), BAD_WORKER_CONFIGS)
def test_bad_worker_configs_are_refused_naming_the_option(fields, message):
    with pytest.raises(ConfigError) as err:
        check(ServeConfig(db=PG, **fields))
    assert message in str(err.value), err.value


def test_each_worker_gets_its_own_port_http_port_and_lease_name():
    cfg = ServeConfig(db=PG, workers=3, port=50051, http_port=9400, advertise="node-1")
    w = [cfg.worker(i) for i in range(3)]
    assert [(x.port, x.private_port, x.http_port, x.advertise, x.server_id, x.ha, x.workers) for x in w] == [
        (50051, 50052 + i, 9400 + i, f"node-1:{50052 + i}", f"node-1:{50052 + i}", True, 1) for i in range(3)
    ]
    assert ServeConfig(db=PG, workers=2, http_port=0, server_id="pod-a").worker(1).http_port == 0
    assert ServeConfig(db=PG, workers=2, server_id="pod-a").worker(1).server_id == "pod-a/1"


@pytest.mark.postgres
@pytest.mark.slow
def test_a_non_owner_names_the_owner_and_clients_follow_it_a_bounded_number_of_times(workers, pg_url):
    srv = workers(pg_url, 2)
    wait_live(pg_url, 2)
    with MixerClient(srv.address) as c:
        c.create_job(spec("redirect"))
    owner = lease_address(pg_url, "redirect")
    (other,) = set(srv.worker_addresses) - {owner}

    # The non-owner's answer: UNAVAILABLE, the owner's address in trailing metadata, and in words.
    with grpc.insecure_channel(other) as ch:
        from mixer.v1 import mixer_pb2 as pb
        from mixer.v1 import mixer_pb2_grpc as pb_grpc

        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.MixerServiceStub(ch).GetJob(pb.GetJobRequest(name="redirect"), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and owner in err.value.details()
    assert owner_of(err.value) == owner

    # MixerClient follows it (and remembers it); so do the shared port and a Reporter.
    for address in (other, srv.address):
        with MixerClient(address, timeout=5) as c:
            assert c.get_job("redirect").name == "redirect"
            c.report("redirect", report(0, "rank0"))
    rep = Reporter(other, "redirect", "rank1", max_backoff=0.3).start()
    rep.submit(report(0, "rank1"))
    assert rep.close(timeout=30), (rep.pending, rep.last_error)
    assert rep.address == owner

    # A lease that names the server asking as the owner's address: it sends the call back to itself.
    store = Store(pg_url)
    with store.engine.begin() as conn:
        conn.execute(
            update(LeaseRow).where(LeaseRow.job_id == store.get_job("redirect").id).values(address=other)
        )
    store.close()
    with MixerClient(other, timeout=5) as c:
        t0 = time.monotonic()
        with pytest.raises(RedirectError) as bounced:
            c.get_job("redirect")
    assert (
        len(bounced.value.path) == MAX_HOPS + 1 and "ownership is changing hands" in bounced.value.details()
    )
    assert time.monotonic() - t0 < 5, "a redirect waited for gRPC's own retries"
    rep = Reporter(other, "redirect", "rank2", max_backoff=0.3).start()
    rep.submit(report(0, "rank2"))
    deadline = time.monotonic() + 20
    while "redirects in a row" not in rep.last_error and time.monotonic() < deadline:
        time.sleep(0.05)
    rep._stop = True
    assert "redirects in a row" in rep.last_error, rep.last_error


SPREAD_JOBS = 24
"""Jobs created through the shared port: a worker gets none with probability 3 (2/3)^24 < 2e-4."""


@pytest.mark.postgres
@pytest.mark.slow
def test_jobs_created_through_one_address_spread_over_the_workers(workers, pg_url):
    """Every job goes to the first live worker of its rendezvous order, whichever worker the one
    client connection reached, so each worker owns some."""
    srv = workers(pg_url, WORKERS)
    live = wait_live(pg_url, WORKERS)
    assert sorted(live.values()) == sorted(srv.worker_addresses)
    jobs = [f"spread{i}" for i in range(SPREAD_JOBS)]
    with MixerClient(srv.address) as c:
        for job in jobs:
            assert c.create_job(spec(job))[1]
        for job in jobs:  # and each is served, through the same connection, by its owner
            assert c.get_job(job).name == job
    owners = {job: lease_address(pg_url, job) for job in jobs}
    assert owners == {job: live[rendezvous_order(job, list(live))[0]] for job in jobs}
    per_worker = Counter(owners.values())
    assert set(per_worker) == set(srv.worker_addresses), per_worker
    print(f"jobs per worker: {sorted(per_worker.values())}")


@pytest.mark.postgres
@pytest.mark.slow
def test_sigkill_of_a_worker_mid_stream_loses_and_doubles_nothing(workers, pg_url):
    """3 workers, 12 jobs, 3 reporters per job on the shared port; SIGKILL the worker that owns the
    most jobs once ~30% of the reports are acknowledged: every acknowledged report is in the log
    exactly once, every job makes versions after the kill, replay reproduces every stored version,
    and the parent starts the killed worker again."""
    t_start = time.monotonic()
    srv = workers(pg_url, WORKERS)
    jobs = [f"mp{i}" for i in range(JOBS)]
    for i, job in enumerate(jobs):  # spread the jobs: each created (and so owned) by worker i % 3
        with MixerClient(srv.worker_addresses[i % WORKERS]) as c:
            c.create_job(spec(job))

    acked: dict[str, list[tuple[str, int, int]]] = {job: [] for job in jobs}
    lock = threading.Lock()

    def hook(job: str, source: str):
        def on_ack(step: int, seq: int) -> None:
            with lock:
                acked[job].append((source, step, seq))

        return on_ack

    reporters = [
        (
            job,
            f"rank{r}",
            Reporter(srv.address, job, f"rank{r}", max_backoff=0.3, on_ack=hook(job, f"rank{r}")).start(),
        )
        for job in jobs
        for r in range(REPORTERS_PER_JOB)
    ]

    def produce() -> None:
        for s in range(STEPS):
            for _, source, rep in reporters:
                rep.submit(report(s, source))
            time.sleep(PACE_S)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    total = STEPS * len(reporters)
    deadline = time.monotonic() + 60
    while sum(map(len, acked.values())) < KILL_AT * total:
        assert time.monotonic() < deadline, "reports are not being acknowledged"
        time.sleep(0.02)

    owners = {job: lease_address(pg_url, job) for job in jobs}
    victim = max(srv.worker_addresses, key=lambda a: sum(o == a for o in owners.values()))
    victim_pid = srv.worker_pids()[victim]
    store = Store(pg_url)
    at_kill = {job: store.version(store.get_job(job).id)[0].version for job in jobs}
    os.kill(victim_pid, signal.SIGKILL)
    killed = time.monotonic()

    producer.join(120)
    for job, source, rep in reporters:
        assert rep.close(timeout=60), (job, source, rep.pending, rep.last_error)
    drained = time.monotonic() - killed

    for job in jobs:
        rec = store.get_job(job)
        rows = list(store.signals(rec.id))
        logged = [(r.source, r.step, r.source_seq) for r in rows]
        assert len(logged) == len(set(logged)), f"{job}: a report is stored twice"
        assert {(src, step) for src, step, _ in logged} == {
            (f"rank{r}", s) for r in range(REPORTERS_PER_JOB) for s in range(STEPS)
        }, f"{job}: a report is missing"
        assert set(acked[job]) <= set(logged), f"{job}: an acknowledged report is not in the log"
        assert [r.seq for r in rows] == list(range(len(rows)))
        versions = [v.version for v, _ in store.versions(rec.id)]
        assert versions == list(range(len(versions))), f"{job}: a version was lost or duplicated"
        assert versions[-1] > at_kill[job], f"{job} made no version after the kill"
        assert verify(store, job).ok, f"{job}: replay does not reproduce the stored versions"
    store.close()

    moved = [job for job in jobs if owners[job] == victim]
    assert moved and all(
        lease_address(pg_url, job) != victim or srv.worker_pids()[victim] != victim_pid for job in moved
    )
    deadline = time.monotonic() + 30
    while srv.worker_pids()[victim] == victim_pid and time.monotonic() < deadline:
        time.sleep(0.1)
    assert srv.worker_pids()[victim] != victim_pid, "the parent did not start the killed worker again"
    assert srv.proc.poll() is None, srv.log()
    assert srv.terminate() == 0, srv.log()[-3000:]
    took = time.monotonic() - t_start
    print(
        f"{len(moved)} jobs moved; all {total} reports acknowledged {drained:.1f}s after the kill; test {took:.1f}s"
    )
