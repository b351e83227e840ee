"""Report batches on a session: each report taken, refused or deduplicated on its own; one ack message."""

from __future__ import annotations

import re
import threading
import urllib.request

import grpc
import numpy as np
import pytest

from mixer.client import MixerClient, channel
from mixer.reporter import Reporter, session_request
from mixer.store import Store
from mixer.v1 import mixer_pb2 as pb
from mixer.v1 import mixer_pb2_grpc as pb_grpc

K = 2


@pytest.fixture
def server(server_on_each_db):
    """Every test here runs on SQLite and on PostgreSQL."""
    return server_on_each_db


def signals(step: int, seq: int = 0, loss: float = 3.0) -> pb.Signals:
    return pb.Signals(step=step, seq=seq, source="w", domain_loss_sum=[loss, 2 * loss], domain_token_count=[1.0, 1.0])


def session(address: str, job: str, *requests: pb.SessionRequest) -> list[pb.SessionResponse]:
    """Send hello + requests, half-close, and collect every response until the stream ends."""
    ch = channel(address)
    try:
        msgs = [pb.SessionRequest(hello=pb.Hello(job=job, source="w")), *requests]
        return list(pb_grpc.MixerServiceStub(ch).Session(iter(msgs), timeout=30))
    finally:
        ch.close()


def test_session_requests_built_from_serialized_reports_are_what_protobuf_would_send():
    small, big = signals(1), pb.Signals(step=2, source="w" * 300, domain_loss_sum=[1.0] * 5000)  # lengths of 1 to 3 varint bytes
    for datas in ([small], [big], [small, big, pb.Signals()]):
        want = pb.SessionRequest(report=datas[0]) if len(datas) == 1 else pb.SessionRequest(reports=pb.ReportBatch(reports=datas))
        assert session_request([d.SerializeToString() for d in datas]) == want.SerializeToString()


def test_a_batch_is_taken_report_by_report_and_acked_in_one_message(server):
    with MixerClient(server.address) as c:
        c.create_job({"name": "batch", "domains": ["a", "b"], "strategy": "odm", "cadence": {"update_every": 2}})
    batch = pb.ReportBatch(reports=[
        signals(0),
        signals(1),
        signals(1),  # the same key again, in the same batch: a duplicate, not counted twice
        signals(2, loss=float("nan")),  # invalid: refused on its own
        signals(3),
    ])
    out = session(server.address, "batch", pb.SessionRequest(reports=batch))
    kinds = [r.WhichOneof("kind") for r in out]
    assert kinds[0] == "welcome" and kinds.count("acks") == 1 and "ack" not in kinds
    nacks = [r.nack for r in out if r.WhichOneof("kind") == "nack"]
    assert [(n.step, n.code) for n in nacks] == [(2, grpc.StatusCode.INVALID_ARGUMENT.value[0])]
    assert "domain_loss_sum" in nacks[0].message
    acks = next(r.acks.acks for r in out if r.WhichOneof("kind") == "acks")
    assert [(a.step, a.duplicate) for a in acks] == [(0, False), (1, False), (1, True), (3, False)]
    assert acks[2].log_seq == acks[1].log_seq  # the duplicate names the original's place in the log
    # update_every 2: the batch triggered an update, and its weights came with the acknowledgement
    ack_msg = next(r.acks for r in out if r.WhichOneof("kind") == "acks")
    assert ack_msg.HasField("latest") and ack_msg.latest.version >= 1 and len(ack_msg.latest.weights) == K
    assert "version" not in kinds  # ...not in a message of their own
    # the next batch resends two of them (a reconnect): duplicates, acked from the log
    out = session(server.address, "batch", pb.SessionRequest(reports=pb.ReportBatch(reports=[signals(1), signals(3), signals(4)])))
    acks = next(r.acks.acks for r in out if r.WhichOneof("kind") == "acks")
    assert [(a.step, a.duplicate) for a in acks] == [(1, True), (3, True), (4, False)]

    store = Store(server.db)
    job = store.get_job("batch")
    steps = [r.step for r in store.signals(job.id)]
    store.close()
    assert steps == [0, 1, 3, 4]
    with MixerClient(server.address) as c:
        versions = c.list_versions("batch")
    assert [v.version for v in versions] == [0, 1, 2]  # update_every 2: after steps 1 and 3 (and 4 is pending)


def test_a_busy_reporter_sends_batches_and_loses_nothing(server):
    with MixerClient(server.address) as c:
        c.create_job({"name": "busy", "domains": ["a", "b"], "strategy": "odm", "cadence": {"update_every": 10}})
    acked: list[tuple[int, int]] = []
    lock = threading.Lock()

    def on_ack(step: int, seq: int) -> None:
        with lock:
            acked.append((step, seq))

    rep = Reporter(server.address, "busy", "w", on_ack=on_ack).start()
    assert rep.connected.wait(30)
    n = 3000
    rng = np.random.default_rng(0)
    for step in range(n):  # far faster than one round trip per report
        rep.submit(signals(step, loss=float(rng.uniform(1, 4))))
    assert rep.wait_pending(0, timeout=60)
    assert rep.close()
    assert sorted(acked) == [(s, 0) for s in range(n)] and rep.acked == n and rep.duplicates == 0

    store = Store(server.db)
    job = store.get_job("busy")
    steps = [r.step for r in store.signals(job.id)]
    store.close()
    assert steps == list(range(n))
    # the service observed fewer ingest messages than reports: they came batched
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/metrics", timeout=10).read().decode()
    messages = float(re.search(r"^mixer_ingest_lag_seconds_count (\S+)$", metrics, re.MULTILINE).group(1))
    assert 0 < messages < n / 2, messages


@pytest.mark.parametrize("seed", range(6))
def test_the_live_loss_of_a_batch_is_the_report_by_report_one(seed: int) -> None:
    """Per domain, loss over tokens in the newest report with tokens there, else the old value:
    set once per batch as a new array, equal to updating it report by report."""
    from mixer.server.admission import _last_loss
    from mixer.signals import Report

    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, 6))
    old = None if seed % 2 else rng.uniform(0, 5, k)
    reports = []
    for s in range(int(rng.integers(1, 6))):
        tokens = rng.uniform(1, 9, k) * (rng.random(k) < (1.0 if seed % 3 == 0 else 0.6))
        reports.append(Report(step=s, source="w", domain_loss_sum=tokens * rng.uniform(1, 4, k), domain_token_count=tokens))
    want = np.zeros(k) if old is None else old.copy()
    for r in reports:
        np.divide(r.domain_loss_sum, r.domain_token_count, out=want, where=r.domain_token_count > 0)
    before = None if old is None else old.copy()
    got = _last_loss(old, reports, k)
    assert got is not old and np.array_equal(got, want), (got, want)
    assert old is None or np.array_equal(old, before)  # the old array is left as readers saw it
