"""Session messages keep each report's bytes as they arrived (the log payload), and only when the
bytes are laid out as protobuf writes them; anything else is parsed as before."""

from __future__ import annotations

import numpy as np

from mixer.client import MixerClient, channel
from mixer.replay import verify
from mixer.reporter import session_request
from mixer.store import Store
from mixer.v1 import mixer_pb2 as pb
from mixer.v1 import mixer_pb2_grpc as pb_grpc
from mixer.wire import SPLIT_BYTES, ReceivedReports, parse_session_request


def report(step: int, samples: int) -> pb.Signals:
    loss = np.linspace(0.5, 3.0, samples, dtype=np.float32)
    return pb.Signals(
        step=step,
        source="w",
        domain_loss_sum=[1.0, 2.0],
        domain_token_count=[3.0, 4.0],
        sample_loss=loss.tobytes(),
        sample_domain=np.zeros(samples, dtype=np.int32).tobytes(),
    )


def test_large_batches_and_reports_keep_their_bytes():
    big = [report(s, 4096) for s in range(3)]
    for msgs, batched in ((big, True), (big[:1], False)):
        got = parse_session_request(session_request([m.SerializeToString() for m in msgs]))
        assert isinstance(got, ReceivedReports) and got.batched is batched
        assert list(got) == msgs
        assert [pb.Signals.FromString(p) for p in got.payloads] == msgs
        assert [bytes(p) for p in got.payloads] == [m.SerializeToString() for m in msgs]


def test_small_messages_and_other_layouts_are_parsed_as_before():
    small = [report(s, 4) for s in range(3)]
    data = session_request([m.SerializeToString() for m in small])
    assert len(data) < SPLIT_BYTES and parse_session_request(data) == pb.SessionRequest.FromString(data)
    one = report(0, 4096).SerializeToString()
    layouts = [
        session_request([one]) + session_request([one]),  # the field twice: protobuf merges them
        session_request([one, one]) + b"\x08\x01",  # a field after the batch (hello's tag, a varint)
        session_request([one, one])[:-1],  # cut short: not a message at all
    ]
    for data in layouts:
        try:
            want = pb.SessionRequest.FromString(data)
        except Exception:  # noqa: BLE001 - the service answers it INVALID_ARGUMENT
            want = None
        if want is None:
            continue
        got = parse_session_request(data)
        assert not isinstance(got, ReceivedReports) and got == want
    hello = pb.SessionRequest(hello=pb.Hello(job="j" * SPLIT_BYTES, source="w")).SerializeToString()
    assert parse_session_request(hello).hello.source == "w"


def test_large_reports_are_logged_as_they_arrived(server_on_each_db):
    """Through a real server into SQLite and PostgreSQL: the log holds each report's own bytes,
    which parse to the report sent, and the log replays to the versions served."""
    server = server_on_each_db
    with MixerClient(server.address) as c:
        c.create_job(
            {"name": "big", "domains": ["a", "b"], "strategy": "odm", "cadence": {"update_every": 2}}
        )
    sent = [report(s, 4096) for s in range(6)]
    requests = [
        pb.SessionRequest(hello=pb.Hello(job="big", source="w")),
        pb.SessionRequest.FromString(session_request([m.SerializeToString() for m in sent[:5]])),
        pb.SessionRequest.FromString(session_request([sent[5].SerializeToString()])),
    ]
    ch = channel(server.address)
    try:
        out = list(pb_grpc.MixerServiceStub(ch).Session(iter(requests), timeout=30))
    finally:
        ch.close()
    acked = [a for r in out if r.WhichOneof("kind") == "acks" for a in r.acks.acks]
    acked += [r.ack for r in out if r.WhichOneof("kind") == "ack"]
    assert sorted(a.step for a in acked) == list(range(6)) and not any(a.duplicate for a in acked)
    store = Store(server.db)
    try:
        job = store.get_job("big")
        logged = {rec.step: pb.Signals.FromString(rec.payload) for rec in store.signals(job.id)}
        assert logged == dict(enumerate(sent))
        result = verify(store, "big")
        assert result.ok and result.versions_checked >= 3 and result.reports == 6
    finally:
        store.close()
