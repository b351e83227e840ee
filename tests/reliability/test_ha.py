"""High availability: two servers on one PostgreSQL, jobs owned through lease rows."""

from __future__ import annotations

import os
import queue
import signal
import threading
import time

import grpc
import numpy as np
import pytest

from mixer.bench.launch import ServerProcess
from mixer.client import MixerClient
from mixer.replay import verify
from mixer.reporter import Reporter
from mixer.store import Store
from mixer.store.models import LeaseRow
from mixer.v1 import mixer_pb2 as pb
from mixer.v1 import mixer_pb2_grpc as pb_grpc
from mixer.wire import report_to_proto
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


def create_on_both(
    db: str, a: ServerProcess, b: ServerProcess, spec: dict = SPEC
) -> tuple[ServerProcess, ServerProcess]:
    """Create the job through `a` once both servers are live (it goes to the one its placement
    names); (owner, the other)."""
    wait_live(db, 2)
    with MixerClient(a.address) as c:
        c.create_job(spec)
    return (a, b) if owner_of(db, spec["name"]) == a.address else (b, a)


def wait_live(db: str, n: int, timeout: float = 20.0) -> dict[str, str]:
    """The live servers (id -> address) once there are `n` of them."""
    store = Store(db, migrate=False)
    try:
        deadline = time.monotonic() + timeout
        while len(live := store.live_servers()) < n:
            assert time.monotonic() < deadline, f"{len(live)} live servers, expected {n}: {live}"
            time.sleep(0.05)
        return live
    finally:
        store.close()


@pytest.mark.postgres
@pytest.mark.slow
def test_killing_the_owner_hands_the_job_over(server_factory, pg_url):
    a = server_factory(pg_url, "--ha", "--lease-ttl", "3")
    b = server_factory(pg_url, "--ha", "--lease-ttl", "3")
    a, b = create_on_both(pg_url, a, b)
    assert owner_of(pg_url, "faults") == a.address
    # The other server does not serve the job while the owner lives; it names the owner (asked
    # through the raw stub: MixerClient itself would follow it to the owner).
    with MixerClient(b.address, timeout=5) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.stub.GetWeights(pb.GetWeightsRequest(job="faults"), timeout=5)
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


def lease_epoch(db: str, job: str) -> int:
    from sqlalchemy import select

    store = Store(db, migrate=False)
    try:
        job_id = store.get_job(job).id
        with store.engine.connect() as conn:
            return conn.scalar(select(LeaseRow.epoch).where(LeaseRow.job_id == job_id))
    finally:
        store.close()


class RawSession:
    """One Session stream to one server, no failover: what it sends and what comes back, as sent."""

    def __init__(self, address: str, job: str, source: str):
        self.channel = grpc.insecure_channel(address)
        self.q: queue.Queue = queue.Queue()
        self.acked: list[tuple[int, int]] = []
        self.nacks: list[pb.Nack] = []
        self.error: grpc.RpcError | None = None
        self.q.put(pb.SessionRequest(hello=pb.Hello(job=job, source=source)))

        def requests():
            while (msg := self.q.get()) is not None:
                yield msg

        self.call = pb_grpc.MixerServiceStub(self.channel).Session(requests())
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        try:
            for resp in self.call:
                kind = resp.WhichOneof("kind")
                if kind == "ack":
                    self.acked.append((resp.ack.step, resp.ack.seq))
                elif kind == "acks":
                    self.acked.extend((a.step, a.seq) for a in resp.acks.acks)
                elif kind == "nack":
                    self.nacks.append(resp.nack)
        except grpc.RpcError as e:
            self.error = e

    def send(self, steps: range, source: str) -> None:
        self.q.put(
            pb.SessionRequest(
                reports=pb.ReportBatch(reports=[report_to_proto(report(s, source)) for s in steps])
            )
        )

    def close(self) -> None:
        self.q.put(None)
        self.call.cancel()
        self.channel.close()


@pytest.mark.postgres
@pytest.mark.slow
def test_a_paused_owner_is_fenced_off_after_the_takeover(server_factory, pg_url):
    """SIGSTOP the owner past its lease, let the other server take the job, SIGCONT the owner: what it
    then tries to commit is refused, nothing is stored twice, and every acknowledged report is in the
    log exactly once."""
    ttl = 2.0
    a = server_factory(pg_url, "--ha", "--lease-ttl", str(ttl))
    b = server_factory(pg_url, "--ha", "--lease-ttl", str(ttl))
    a, b = create_on_both(pg_url, a, b)
    first, paused, total = range(40), range(40, 80), 80
    sess = RawSession(a.address, "faults", "rank0")
    try:
        sess.send(first, "rank0")
        deadline = time.monotonic() + 30
        while len(sess.acked) < len(first) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sorted(s for s, _ in sess.acked) == list(first), (sess.acked, sess.nacks, sess.error)
        epoch = lease_epoch(pg_url, "faults")

        os.kill(a.proc.pid, signal.SIGSTOP)
        try:
            # Reports reach the paused owner's socket; it cannot read them until it runs again.
            sess.send(paused, "rank0")
            time.sleep(ttl * 1.5)
            with MixerClient(b.address, timeout=5) as c:  # the lease has run out: b takes the job
                taken_at = time.monotonic()
                while True:
                    try:
                        c.stub.GetWeights(pb.GetWeightsRequest(job="faults"), timeout=5)  # b itself
                        break
                    except grpc.RpcError as e:
                        assert time.monotonic() - taken_at < 20, f"b never took the job: {e.details()}"
                        time.sleep(0.1)
            assert owner_of(pg_url, "faults") == b.address
            assert lease_epoch(pg_url, "faults") == epoch + 1
        finally:
            os.kill(a.proc.pid, signal.SIGCONT)

        # The old owner reads the paused reports now; it must not acknowledge (commit) any of them.
        deadline = time.monotonic() + 20
        while len(sess.nacks) < len(paused) and sess.error is None and time.monotonic() < deadline:
            time.sleep(0.05)
        late = [k for k in sess.acked if k[0] in paused]
        assert not late, f"the fenced-off owner acknowledged {late}"
        refused = {n.step for n in sess.nacks} | (set(paused) if sess.error is not None else set())
        assert refused == set(paused), (sess.nacks, sess.error)
        assert all(n.code == grpc.StatusCode.UNAVAILABLE.value[0] for n in sess.nacks), sess.nacks
        if sess.error is not None:
            assert sess.error.code() == grpc.StatusCode.UNAVAILABLE, sess.error
    finally:
        sess.close()
    store = Store(pg_url)
    assert store.log_stats(store.get_job("faults").id)[0] == len(first), (
        "the fenced-off owner wrote to the log"
    )
    store.close()
    assert a.proc.poll() is None, a.log()

    # The worker resends everything it holds (the acknowledged ones too) through either server.
    acked: list[tuple[int, int]] = []
    rep = Reporter(
        f"{a.address},{b.address}",
        "faults",
        "rank0",
        max_backoff=0.3,
        on_ack=lambda step, seq: acked.append((step, seq)),
    ).start()
    for s in range(total):
        rep.submit(report(s, "rank0"))
    assert rep.close(timeout=60), (rep.pending, rep.last_error)
    assert owner_of(pg_url, "faults") == b.address
    assert rep.duplicates == len(first)

    store = Store(pg_url)
    rec = store.get_job("faults")
    logged = [(s.step, s.source_seq) for s in store.signals(rec.id)]
    assert sorted(logged) == sorted(set(logged)) == sorted({*sess.acked, *acked}), (
        "an acknowledged report is missing or stored twice"
    )
    assert [s.seq for s in store.signals(rec.id)] == list(range(total))
    versions = [v.version for v, _ in store.versions(rec.id)]
    assert versions == list(range(len(versions))), "a version was lost or duplicated"
    assert verify(store, "faults").ok
    store.close()


def test_ha_needs_postgres(tmp_path):
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "mixer.cli", "serve", "--db", str(tmp_path / "x.db"), "--ha"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0 and "PostgreSQL" in out.stderr


def open_transactions(db: str) -> int:
    """Sessions of the test database that hold a transaction open while their client is quiet."""
    import psycopg

    with psycopg.connect(db, autocommit=True) as conn:
        return conn.execute(
            "select count(*) from pg_stat_activity where datname = current_database() and state = 'idle in transaction'"
        ).fetchone()[0]


def activity(db: str) -> str:
    """The test database's sessions (state, wait, how long in its transaction, query), for a
    failure's message: what holds a lock, and what waits."""
    import psycopg

    with psycopg.connect(db, autocommit=True) as conn:
        rows = conn.execute(
            "select pid, state, wait_event_type, wait_event, round(extract(epoch from now() - xact_start)::numeric, 1),"
            " left(query, 80) from pg_stat_activity where datname = current_database() and pid <> pg_backend_pid()"
        ).fetchall()
    return "\n".join(" | ".join(str(c) for c in r) for r in rows)


@pytest.mark.postgres
def test_a_lease_holder_paused_anywhere_in_its_commit_loses_the_lock_within_its_limit(pg_url):
    """Paused between any two statements of a group commit (several jobs, each with signals, a
    version and a snapshot), the owner's backend is "idle in transaction", so the database ends
    it after max_transaction_idle and the lease rows are free; the paused commit then fails and
    writes nothing. And the commit is statements only, never an executemany: PostgreSQL's
    driver pipelines those, and a backend inside a pipeline is "active", out of the timeout's
    reach, for as long as its client is paused."""
    import psycopg
    from sqlalchemy import event

    from mixer.store import Append, LogEntry
    from mixer.store.records import Fence
    from mixer.types import Version

    idle = 0.5
    store = Store(pg_url, max_transaction_idle=idle)
    jobs = [store.create_job(name, "{}", name, "static")[0].id for name in ("p", "q", "r")]
    for job_id in jobs:
        assert store.acquire_lease(job_id, "a", "a:1", 60.0)[0]
    fence = Fence("a", 60.0)

    def commit(n: int) -> list[Append]:
        return [
            Append(
                job_id,
                signals=[LogEntry(n, n, "w", 0, -1, 1, pb.Signals(step=n).SerializeToString())],
                versions=[Version(n + 1, n, np.full(2, 0.5), trigger_step=n, log_seq=n)],
                snapshot=(n + 1, n, b"state"),
            )
            for job_id in jobs
        ]

    statements: list[tuple[str, bool]] = []
    pause_at = {"k": -1}
    paused, resume = threading.Event(), threading.Event()
    backend = {}

    def after(conn, cursor, statement, params, context, executemany):
        statements.append((statement.split(" (")[0][:40], executemany))
        if len(statements) - 1 == pause_at["k"]:
            backend["pid"] = cursor.connection.info.backend_pid
            paused.set()
            resume.wait(30)

    event.listen(store.engine, "after_cursor_execute", after)
    store.append(commit(0), fence)  # the commit's statements, counted
    steps = list(statements)
    assert not any(many for _, many in steps), f"an executemany in the commit path: {steps}"
    assert len(steps) >= 4, steps

    for k in range(len(steps)):
        statements.clear()
        paused.clear()
        resume.clear()
        pause_at["k"] = k
        failed: list[BaseException] = []
        t = threading.Thread(target=_commit_or_fail, args=(store, commit(k + 1), fence, failed))
        t.start()
        assert paused.wait(10), f"the commit never reached statement {k}"
        with psycopg.connect(pg_url, autocommit=True) as obs:
            state = obs.execute("select state from pg_stat_activity where pid = %s", (backend["pid"],)).fetchone()
            assert state == ("idle in transaction",), f"paused after {steps[k][0]!r}: {state}\n{activity(pg_url)}"
            t0 = time.monotonic()
            while obs.execute("select 1 from pg_stat_activity where pid = %s", (backend["pid"],)).fetchone():
                assert time.monotonic() - t0 < idle + 5, f"paused after {steps[k][0]!r}, not ended\n{activity(pg_url)}"
                time.sleep(0.05)
            with obs.transaction():  # the lease rows are free
                obs.execute("select 1 from leases where job_id = any(%s) for update nowait", (jobs,))
        resume.set()
        t.join(30)
        assert failed, f"paused after {steps[k][0]!r} past the limit, the commit still succeeded"
        assert "idle-in-transaction timeout" in str(failed[0]), failed[0]
        for job_id in jobs:  # nothing of the paused commit was written
            assert [s.seq for s in store.signals(job_id)] == [0]
            assert [v.version for v, _ in store.versions(job_id)] == [1]
            assert store.latest_snapshot(job_id) == (1, 0, b"state")
    event.remove(store.engine, "after_cursor_execute", after)
    store.close()


@pytest.mark.postgres
def test_a_heartbeat_and_a_commit_lock_lease_rows_in_one_order(pg_url):
    """A group commit holding one job's lease row while the heartbeat renews that job and another:
    both lock rows in job order, so the heartbeat waits and both succeed. In opposite orders they
    would deadlock, and PostgreSQL would abort one: a failed heartbeat drops every job it renews."""
    from sqlalchemy import event

    from mixer.store import Append, LogEntry
    from mixer.store.records import Fence

    store = Store(pg_url)
    jobs = [store.create_job(name, "{}", name, "static")[0].id for name in ("p", "q")]
    for job_id in jobs:
        assert store.acquire_lease(job_id, "a", "a:1", 60.0)[0]
    paused, resume = threading.Event(), threading.Event()

    def after(conn, cursor, statement, params, context, executemany):
        if threading.current_thread().name == "commit" and statement.startswith("UPDATE leases") and not paused.is_set():
            paused.set()  # the commit holds the first job's lease row
            resume.wait(30)

    event.listen(store.engine, "after_cursor_execute", after)
    errors: list[BaseException] = []

    def run(fn) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - the test reports any failure of either side
            errors.append(e)

    batch = [Append(j, signals=[LogEntry(0, 0, "w", 0, -1, 1, b"")]) for j in jobs]
    commit = threading.Thread(target=run, args=(lambda: store.append(batch, Fence("a", 60.0)),), name="commit")
    commit.start()
    assert paused.wait(10)
    lost: list[list[int]] = []
    beat = threading.Thread(target=run, args=(lambda: lost.append(store.heartbeat("a", "a:1", 60.0, jobs[::-1])),))
    beat.start()
    time.sleep(0.5)  # the heartbeat reaches the lease rows and waits for the commit's
    resume.set()
    commit.join(30)
    beat.join(30)
    event.remove(store.engine, "after_cursor_execute", after)
    assert not errors, f"{errors}\n{activity(pg_url)}"
    assert lost == [[]]
    assert all(len(list(store.signals(j))) == 1 for j in jobs)
    store.close()


def _commit_or_fail(store: Store, batch, fence, failed: list) -> None:
    from sqlalchemy.exc import DBAPIError

    try:
        store.append(batch, fence)
    except DBAPIError as e:  # the database ended the paused transaction
        failed.append(e)


@pytest.mark.postgres
@pytest.mark.slow
def test_an_owner_paused_inside_a_commit_does_not_block_the_takeover(server_factory, pg_url):
    """SIGSTOP the owner while its group commit holds the lease row locked: the database ends that
    transaction, the other server takes the job, and the old owner's commit is lost, not doubled."""
    ttl = 2.0
    a = server_factory(pg_url, "--ha", "--lease-ttl", str(ttl))
    b = server_factory(pg_url, "--ha", "--lease-ttl", str(ttl))
    a, b = create_on_both(pg_url, a, b)
    acked: list[tuple[int, int]] = []
    rep = Reporter(
        f"{a.address},{b.address}",
        "faults",
        "rank0",
        max_backoff=0.3,
        on_ack=lambda s, q: acked.append((s, q)),
    ).start()
    steps = 3000
    producer = threading.Thread(
        target=lambda: [rep.submit(report(s, "rank0")) or time.sleep(0.002) for s in range(steps)],
        daemon=True,
    )
    producer.start()
    while len(acked) < 50:
        time.sleep(0.01)
    rng = np.random.default_rng(0)
    for _attempt in range(400):  # stop the owner until it is caught inside a transaction
        os.kill(a.proc.pid, signal.SIGSTOP)
        time.sleep(0.05)
        if open_transactions(pg_url):
            break
        os.kill(a.proc.pid, signal.SIGCONT)
        time.sleep(rng.uniform(0.005, 0.03))
    else:
        pytest.fail("never caught the owner inside a transaction")
    try:
        t0 = time.monotonic()
        with MixerClient(b.address, timeout=3) as c:
            while True:
                try:
                    c.stub.GetWeights(pb.GetWeightsRequest(job="faults"), timeout=3)  # b itself
                    break
                except grpc.RpcError as e:
                    assert time.monotonic() - t0 < 20, (
                        f"the paused owner's open transaction blocks the takeover: {e.code()} {e.details()}\n"
                        f"{activity(pg_url)}"
                    )
                    time.sleep(0.2)
        took = time.monotonic() - t0
        assert owner_of(pg_url, "faults") == b.address
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
    producer.join(60)
    assert rep.close(timeout=90), (rep.pending, rep.last_error)

    store = Store(pg_url)
    rec = store.get_job("faults")
    logged = [(s.step, s.source_seq) for s in store.signals(rec.id)]
    assert len(logged) == len(set(logged)) == steps, "a report is missing or stored twice"
    assert set(acked) <= set(logged)
    assert [s.seq for s in store.signals(rec.id)] == list(range(steps))
    assert verify(store, "faults").ok
    store.close()
    print(f"takeover {took:.2f}s after pausing the owner mid-commit")


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_watch_follows_the_job_to_its_new_owner_when_the_owner_stops(server_factory, pg_url, stop):
    """Watch a job (MixerClient given both servers) while reports make versions; kill the owner, or
    stop it gracefully, mid-stream: the watch reconnects, reaches the new owner, and delivers every
    version once, in order, equal to the stored ones."""
    ttl = 2.0
    a = server_factory(pg_url, "--ha", "--lease-ttl", str(ttl))
    b = server_factory(pg_url, "--ha", "--lease-ttl", str(ttl))
    a, b = create_on_both(pg_url, a, b)
    steps, kill_after = 400, 150
    got: list[pb.WeightVersion] = []
    watch_error: list[BaseException] = []
    caught_up: list[float] = []
    watcher = MixerClient(f"{a.address},{b.address}", timeout=5)

    def watch() -> None:
        try:
            for v in watcher.watch("faults", after=-1, timeout=90):
                got.append(v)
                if v.version == steps // 5:  # one version per 5 steps after the initial one
                    caught_up.append(time.monotonic())
                    return
        except Exception as e:  # noqa: BLE001 (reported by the test thread)
            watch_error.append(e)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    rep = Reporter(f"{a.address},{b.address}", "faults", "rank0", max_backoff=0.3).start()
    for s in range(steps):
        rep.submit(report(s, "rank0"))
        if s == kill_after:
            deadline = time.monotonic() + 30
            while len(got) < kill_after // 5 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(got) >= kill_after // 5, (len(got), watch_error, rep.last_error)
            seen_at_kill = len(got)
            stopped = time.monotonic()
            a.proc.send_signal(stop)
        time.sleep(0.005)
    assert rep.close(timeout=60), (rep.pending, rep.last_error)
    t.join(60)
    watcher.close()
    assert not watch_error, watch_error
    assert not t.is_alive(), f"the watch stopped at version {got[-1].version if got else None}"
    assert owner_of(pg_url, "faults") == b.address
    if stop == signal.SIGKILL:  # calls go on to the next configured server while the first is down
        with MixerClient(f"{a.address},{b.address}", timeout=5) as c:
            assert c.get_weights("faults").version == steps // 5
    store = Store(pg_url)
    stored = {v.version: v for v, _ in store.versions(store.get_job("faults").id)}
    store.close()
    assert [v.version for v in got] == sorted(stored) == list(range(steps // 5 + 1)), (
        "a version was lost or delivered twice"
    )
    for v in got:
        assert np.array_equal(np.array(v.weights), stored[v.version].weights), v.version
        assert v.effective_step == stored[v.version].effective_step
    assert len(got) > seen_at_kill, "nothing was delivered after the owner stopped"
    assert a.proc.wait(30) == (0 if stop == signal.SIGTERM else -signal.SIGKILL)
    took = caught_up[0] - stopped
    if stop == signal.SIGKILL:  # a lease TTL, the reconnect back-off, and the rest of the reports
        assert took < 20, f"the watch took {took:.1f}s to catch up after the kill"
    print(
        f"watch ({stop.name}): {seen_at_kill} versions before, {len(got) - seen_at_kill} after; "
        f"all delivered {took:.1f}s after the stop"
    )
