"""Server behaviour: graceful SIGTERM, health, watch, weights at a step, metrics, CLI JSON."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mixer.client import MixerClient
from mixer.reporter import Reporter
from mixer.signals import Report
from mixer.store import Store

SPEC = {"name": "srv", "domains": ["a", "b", "c"], "strategy": "odm", "cadence": {"update_every": 5}}


def report(step: int, source: str = "w") -> Report:
    return Report(
        step=step,
        source=source,
        domain_loss_sum=np.array([10.0, 40.0, 20.0]),
        domain_token_count=np.array([10.0, 10.0, 10.0]),
        domain_sample_count=np.array([2, 2, 2]),
    )


def test_health_reflection_and_weights_at_step(server):
    with grpc.insecure_channel(server.address) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="mixer.v1.MixerService"), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
    with MixerClient(server.address) as c:
        c.create_job(SPEC)
        for s in range(40):
            c.report("srv", report(s))
        versions = c.list_versions("srv")
        assert [v.version for v in versions] == list(range(len(versions)))
        assert len(versions) == 9  # the initial version and one per 5 steps
        for v in versions[1:]:
            at = c.get_weights("srv", step=v.effective_step)
            assert at.version == v.version
            before = c.get_weights("srv", step=v.effective_step - 1)
            assert before.version == v.version - 1
        assert c.get_weights("srv", version=3).version == 3
        latest = c.get_weights("srv")
        assert latest.version == versions[-1].version and list(latest.domains) == ["a", "b", "c"]
        assert abs(sum(latest.weights) - 1) < 1e-12


def test_watch_gets_history_then_new_versions(server):
    with MixerClient(server.address) as c:
        c.create_job(SPEC)
        for s in range(10):
            c.report("srv", report(s))
        got: list[int] = []
        done = threading.Event()

        def watch():
            for v in c.watch("srv", after=-1, timeout=30):
                got.append(v.version)
                if v.version >= 4:
                    done.set()
                    return

        t = threading.Thread(target=watch, daemon=True)
        t.start()
        for s in range(10, 20):
            c.report("srv", report(s))
        assert done.wait(30), got
        assert got == [0, 1, 2, 3, 4]


def test_watch_batches_what_is_ready_together_within_max_batch(server):
    """max_batch > 1: the history, and the versions one commit made, arrive together, in order,
    at most max_batch per message; 0 keeps one per message; a value out of range is refused."""
    from mixer.server.service import WATCH_BATCH_MAX
    from mixer.v1 import mixer_pb2 as pb
    from mixer.v1 import mixer_pb2_grpc
    from mixer.wire import report_to_proto

    per_window = SPEC["cadence"]["update_every"]
    with MixerClient(server.address) as c:
        c.create_job(SPEC)
        for s in range(7 * per_window):
            c.report("srv", report(s))
        history = [v.version for v in c.list_versions("srv")]
    with grpc.insecure_channel(server.address) as ch:
        stub = mixer_pb2_grpc.MixerServiceStub(ch)

        def messages(max_batch: int, count: int, after: int = -1) -> list[list[int]]:
            got, seen = [], 0
            call = stub.WatchWeights(pb.WatchWeightsRequest(job="srv", after_version=after, max_batch=max_batch), timeout=30)
            for resp in call:
                got.append([v.version for v in (resp.version, *resp.more)])
                seen += len(got[-1])
                if seen >= count:
                    call.cancel()
                    break
            return got

        for max_batch in (0, 1, 3, len(history)):
            got = messages(max_batch, len(history))
            assert [v for m in got for v in m] == history, (max_batch, got)
            assert max(len(m) for m in got) == min(max(1, max_batch), len(history)), (max_batch, got)

        # Live: one Session message that closes three windows makes three versions in one commit.
        newest = history[-1]
        out: list[list[int]] = []
        subscribed = threading.Event()

        def watch():
            call = stub.WatchWeights(pb.WatchWeightsRequest(job="srv", after_version=newest - 1, max_batch=16), timeout=30)
            for resp in call:
                out.append([v.version for v in (resp.version, *resp.more)])
                subscribed.set()
                if out[-1][-1] >= newest + 3:
                    return

        t = threading.Thread(target=watch, daemon=True)
        t.start()
        assert subscribed.wait(30)
        first = 7 * per_window
        batch = [report_to_proto(report(s, "w2")) for s in range(first, first + 3 * per_window)]
        requests = iter([pb.SessionRequest(hello=pb.Hello(job="srv", source="w2")), pb.SessionRequest(reports=pb.ReportBatch(reports=batch))])
        for resp in stub.Session(requests, timeout=30):
            if resp.WhichOneof("kind") == "acks":
                break
        t.join(30)
        assert out == [[newest], [newest + 1, newest + 2, newest + 3]], out

        for bad in (-1, WATCH_BATCH_MAX + 1):
            with pytest.raises(grpc.RpcError) as err:
                messages(bad, 1)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_batch" in err.value.details(), bad


def test_every_session_of_a_job_gets_each_new_version_as_stored(server):
    """Two sessions of one job: the version a batch makes rides with that session's acks and is
    pushed to the other; both messages equal the stored version (the message is built once per
    version for all sessions, never one version late)."""
    import queue

    from mixer.v1 import mixer_pb2 as pb
    from mixer.v1 import mixer_pb2_grpc
    from mixer.wire import report_to_proto

    per_window = SPEC["cadence"]["update_every"]
    with MixerClient(server.address) as c, grpc.insecure_channel(server.address) as ch:
        c.create_job(SPEC)
        stub = mixer_pb2_grpc.MixerServiceStub(ch)
        sends = {w: queue.Queue() for w in ("w1", "w2")}
        streams = {}
        for w, q in sends.items():
            q.put(pb.SessionRequest(hello=pb.Hello(job="srv", source=w)))
            streams[w] = stub.Session(iter(q.get, None), timeout=60)
            assert next(streams[w]).WhichOneof("kind") == "welcome"
        step = 0
        for sender, other in (("w1", "w2"), ("w2", "w1"), ("w1", "w2")):
            batch = [report_to_proto(report(s, sender)) for s in range(step, step + per_window)]
            step += per_window
            sends[sender].put(pb.SessionRequest(reports=pb.ReportBatch(reports=batch)))
            resp = next(streams[sender])
            assert resp.WhichOneof("kind") == "acks" and resp.acks.HasField("latest"), resp
            pushed = next(streams[other])
            assert pushed.WhichOneof("kind") == "version", pushed
            stored = {v.version: v for v in c.list_versions("srv")}  # read from the database
            for got in (resp.acks.latest, pushed.version):
                want = stored[got.version]
                assert got.version == max(stored)
                assert list(got.weights) == want.weights.tolist() and json.loads(got.params_json) == want.params
                assert got.created_at == c.get_weights("srv", version=got.version).created_at >= want.created_at > 0
        for q in sends.values():
            q.put(None)
        for stream in streams.values():
            assert [r.WhichOneof("kind") for r in stream] in ([], ["version"])


def test_a_history_longer_than_a_page_is_watched_whole_and_in_order(server):
    """The history is read a page at a time: every version arrives, once, in order."""
    from mixer.server.service import WATCH_HISTORY_PAGE

    spec = dict(SPEC, name="long-history", cadence={"update_every": 1})
    steps = WATCH_HISTORY_PAGE + 40
    with MixerClient(server.address) as c:
        c.create_job(spec)
        rep = Reporter(server.address, "long-history", "w").start()
        for s in range(steps):
            rep.submit(report(s))
        assert rep.close(timeout=120), rep.last_error
        newest = c.get_weights("long-history").version
        assert newest > WATCH_HISTORY_PAGE
        got = []
        for v in c.watch("long-history", after=-1, timeout=60):
            got.append(v.version)
            if v.version == newest:
                break
    assert got == list(range(newest + 1))


def test_metrics_expose_per_domain_series(server_on_each_db):
    server = server_on_each_db
    with MixerClient(server.address) as c:
        c.create_job(SPEC)
        for s in range(12):
            c.report("srv", report(s))
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/metrics", timeout=5).read().decode()
    for needle in (
        'mixer_domain_weight{domain="b",job="srv"}',
        'mixer_domain_loss{domain="b",job="srv"} 4.0',
        'mixer_reports_total{job="srv"} 12.0',
        'mixer_samples_total{job="srv"} 72.0',
        'mixer_weight_version{job="srv"} 2.0',
        "mixer_rpc_duration_seconds_bucket",
        "mixer_db_commit_duration_seconds_count",
        "mixer_strategy_update_duration_seconds_count",
    ):
        assert needle in text, needle
    api = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/api/jobs/srv", timeout=5).read())
    assert api["version"] == 2 and api["domains"] == ["a", "b", "c"]


def test_sigterm_is_graceful_and_nothing_acknowledged_is_lost(server):
    with MixerClient(server.address) as c:
        c.create_job(SPEC)
    rep = Reporter(server.address, "srv", "w", max_backoff=0.2).start()
    for s in range(3000):
        rep.submit(report(s))
    while rep.acked < 200:
        pass
    assert server.terminate() == 0, server.log()
    assert "mixer stopped" in server.log()
    acked_before = rep.acked
    store = Store(server.db)
    rec = store.get_job("srv")
    assert store.log_stats(rec.id)[0] >= acked_before
    store.close()
    server.start()
    assert rep.close(timeout=60), rep.pending
    store = Store(server.db)
    steps = sorted(s.step for s in store.signals(rec.id))
    assert steps == list(range(3000))
    store.close()


def test_cli_json_output(server, tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text("name: clijob\ndata_path: 0.3 /data/web 0.7 /data/code\nstrategy: odm\n")

    def mixer(*args):
        out = subprocess.run([sys.executable, "-m", "mixer.cli", *args, "--address", server.address, "--json"], check=False, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])

    created = mixer("job", "create", str(spec))
    assert created["created"] and created["domains"] == ["web", "code"]
    assert mixer("job", "list")["jobs"][0]["name"] == "clijob"
    assert mixer("job", "show", "clijob")["spec"]["domains"][0]["prefix"] == "/data/web"
    w = mixer("weights", "clijob")
    assert w["versions"][0]["weights"] == [0.3, 0.7]
    assert mixer("weights", "clijob", "--step", "5")["versions"][0]["version"] == 0
    bad = subprocess.run([sys.executable, "-m", "mixer.cli", "job", "show", "nope", "--address", server.address], check=False, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "NOT_FOUND" in bad.stderr
