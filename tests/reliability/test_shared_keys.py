"""Two sources on one session whose reports share (step, seq): a worker's training reports and its
"/val" validation reports go through one Reporter (as MixerWorker sends them). Acks and Nacks name
(source, step, seq); each report is acknowledged once, and the Reporter drains exactly the reports
each one names."""

from __future__ import annotations

import numpy as np

from mixer.client import MixerClient
from mixer.reporter import Reporter
from mixer.signals import Report
from mixer.store import Store

SPEC = {"name": "same-keys", "domains": ["a", "b"], "strategy": "odm"}


def test_reports_of_two_sources_with_the_same_keys_all_drain(server):
    with MixerClient(server.address) as c:
        c.create_job(SPEC)
    steps = range(1, 21)
    rep = Reporter(server.address, "same-keys", "w").start()
    assert rep.connected.wait(10)
    for t in steps:  # back to back, so that pairs with one key ride in one batch and one AckBatch
        rep.submit(
            Report(
                step=t,
                source="w",
                domain_loss_sum=np.array([1.0, 2.0]),
                domain_token_count=np.array([1.0, 1.0]),
            )
        )
        rep.submit(Report(step=t, source="w/val", val_loss=np.array([1.5, 2.5])))
    assert rep.close(timeout=20), (
        f"{rep.pending} reports never left the buffer though the service acknowledged {rep.acked}"
    )
    assert rep.acked == 2 * len(steps) and not rep.rejected

    store = Store(server.db, migrate=False)
    logged = sorted((s.source, s.step) for s in store.signals(store.get_job("same-keys").id))
    store.close()
    assert logged == sorted((src, t) for t in steps for src in ("w", "w/val"))


def test_a_refused_report_does_not_release_another_sources_report_of_the_same_key(server):
    """In a batch, refused reports are answered (Nack) before the batch's acknowledgement: the Nack
    of "w/val" step t must not release "w"'s report of the same (step, seq), still uncommitted."""
    import grpc

    from mixer.v1 import mixer_pb2 as pb
    from mixer.v1 import mixer_pb2_grpc
    from mixer.wire import report_to_proto

    spec = dict(SPEC, name="same-keys-nack")
    with MixerClient(server.address) as c:
        c.create_job(spec)
    good = report_to_proto(
        Report(
            step=4, source="w", domain_loss_sum=np.array([1.0, 2.0]), domain_token_count=np.array([1.0, 1.0])
        )
    )
    bad = report_to_proto(
        Report(
            step=4,
            source="w/val",
            domain_loss_sum=np.array([1.0, 2.0]),
            domain_token_count=np.array([-1.0, 1.0]),
        )
    )  # a negative count: refused
    with grpc.insecure_channel(server.address) as ch:
        stub = mixer_pb2_grpc.MixerServiceStub(ch)
        requests = iter(
            [
                pb.SessionRequest(hello=pb.Hello(job=spec["name"], source="w")),
                pb.SessionRequest(reports=pb.ReportBatch(reports=[good, bad])),
            ]
        )
        responses = []
        for resp in stub.Session(requests, timeout=20):
            responses.append(resp)
            if resp.WhichOneof("kind") == "acks":
                break
    kinds = [r.WhichOneof("kind") for r in responses]
    assert kinds == ["welcome", "nack", "acks"], kinds
    assert (responses[1].nack.source, responses[1].nack.step) == ("w/val", 4)
    assert [(a.source, a.step) for a in responses[2].acks.acks] == [("w", 4)]


def test_a_session_takes_its_own_source_and_those_below_it_only(server):
    """hello.source names the session: "w" and "w/val" are taken, "x" is refused on its own."""
    import grpc

    from mixer.v1 import mixer_pb2 as pb
    from mixer.v1 import mixer_pb2_grpc
    from mixer.wire import report_to_proto

    spec = dict(SPEC, name="own-source")
    with MixerClient(server.address) as c:
        c.create_job(spec)

    def rep(source: str):
        return report_to_proto(
            Report(
                step=2,
                source=source,
                domain_loss_sum=np.array([1.0, 2.0]),
                domain_token_count=np.array([1.0, 1.0]),
            )
        )

    with grpc.insecure_channel(server.address) as ch:
        stub = mixer_pb2_grpc.MixerServiceStub(ch)
        requests = iter(
            [
                pb.SessionRequest(hello=pb.Hello(job=spec["name"], source="w")),
                pb.SessionRequest(
                    reports=pb.ReportBatch(reports=[rep("w"), rep("x"), rep("w/val"), rep("wx")])
                ),
            ]
        )
        responses = []
        for resp in stub.Session(requests, timeout=20):
            responses.append(resp)
            if resp.WhichOneof("kind") == "acks":
                break
    nacks = [r.nack for r in responses if r.WhichOneof("kind") == "nack"]
    assert sorted(n.source for n in nacks) == ["wx", "x"]
    assert all(
        n.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "open a session per source" in n.message
        for n in nacks
    )
    assert [a.source for a in responses[-1].acks.acks] == ["w", "w/val"]
    store = Store(server.db, migrate=False)
    logged = sorted(s.source for s in store.signals(store.get_job("own-source").id))
    store.close()
    assert logged == ["w", "w/val"]
