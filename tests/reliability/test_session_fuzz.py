"""Fuzzing the Session stream's framing against a real server: hellos (duplicate, late, for other
jobs), reports and batches in and out of order, interleaved sources, retired heartbeat frames and garbage. Every
call ends with a clean status, the server stays healthy, and every acknowledged report is in the
log exactly once."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixer.bench.launch import ServerProcess
from mixer.client import MixerClient
from mixer.signals import Report
from mixer.store import Store
from mixer.v1 import mixer_pb2 as pb
from mixer.wire import report_to_proto

JOB = "frames"
SPEC = {
    "name": JOB,
    "domains": ["a", "b"],
    "strategy": "odm",
    "cadence": {"update_every": 3, "max_step_lag": 60},
}
SOURCES = ("w0", "w1", "w2")
SESSION = "/mixer.v1.MixerService/Session"
CLEAN = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
"""What a stream or a Nack may end with: anything but UNKNOWN, INTERNAL and the like (a server fault)."""
CALL_SECONDS = 20.0
CODES = {c.value[0]: c for c in grpc.StatusCode}


def signals(step: int, seq: int, source: str, valid: bool) -> pb.Signals:
    tokens = np.array([8.0, 8.0]) if valid else np.array([8.0, -1.0])
    r = Report(
        step=step,
        source=source,
        seq=seq,
        domain_loss_sum=np.array([16.0 + step % 5, 20.0]),
        domain_token_count=tokens,
    )
    return report_to_proto(r)


keys = st.tuples(st.integers(-2, 45), st.integers(-1, 3), st.sampled_from(SOURCES))
reports = st.builds(lambda k, valid: signals(*k, valid), keys, st.sampled_from([True, True, True, False]))
frames = st.one_of(
    st.builds(
        lambda job, src: ("hello", pb.SessionRequest(hello=pb.Hello(job=job, source=src))),
        st.sampled_from([JOB, JOB, "nope", ""]),
        st.sampled_from([*SOURCES, ""]),
    ),
    st.builds(lambda r: ("one", pb.SessionRequest(report=r)), reports),
    st.builds(
        lambda rs: ("batch", pb.SessionRequest(reports=pb.ReportBatch(reports=rs))),
        st.lists(reports, max_size=6),
    ),
    # The retired heartbeat (field 3, now reserved), as an older client would still send it: a valid
    # protobuf with an unknown field, which the service ignores.
    st.builds(lambda s: ("legacy", b"\x1a\x02\x08" + bytes([s])), st.integers(0, 50)),
    st.just(("empty", pb.SessionRequest())),
    st.builds(lambda b: ("garbage", b), st.binary(min_size=1, max_size=40)),
)


def _adopt(draw, frame, source: str):
    kind, f = frame
    if kind not in ("one", "batch"):
        return frame
    copy = pb.SessionRequest()
    copy.CopyFrom(f)
    for m in [copy.report] if kind == "one" else copy.reports.reports:
        if draw(st.booleans()):
            m.source = draw(st.sampled_from([source, f"{source}/val"]))
    return kind, copy


@st.composite
def streams(draw):
    """A stream as drawn (a report before any hello, duplicate hellos, garbage anywhere), or after a
    hello; the latter often with a new source whose reports, in order, are mixed in with the rest."""
    drawn = draw(st.lists(frames, max_size=10))
    shape = draw(st.sampled_from(["raw", "hello", "source", "source"]))
    if shape == "raw":
        return drawn
    source = draw(st.sampled_from(SOURCES)) if shape == "hello" else f"n{draw(st.integers(0, 10**9))}"
    hello = ("hello", pb.SessionRequest(hello=pb.Hello(job=JOB, source=source)))
    # A session takes its own source and those below it; about half the drawn reports get one of
    # them, the rest keep a foreign source (refused on their own).
    drawn = [_adopt(draw, frame, source) for frame in drawn]
    if shape == "hello":
        return [hello, *drawn]
    own = sorted(draw(st.sets(st.tuples(st.integers(0, 45), st.integers(0, 3)), min_size=1, max_size=8)))
    mine = [("one", pb.SessionRequest(report=signals(step, seq, source, True))) for step, seq in own]
    at = sorted(draw(st.lists(st.integers(0, len(drawn)), min_size=len(mine), max_size=len(mine))))
    out = [hello]
    for i, frame in enumerate(drawn + [None]):
        out.extend(m for j, m in zip(at, mine, strict=True) if j == i)
        if frame is not None:
            out.append(frame)
    return out


@pytest.fixture(scope="module")
def frame_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("frames")
    srv = ServerProcess(str(d / "mixer.db"), d, ["--hello-timeout", "5"]).start()
    with MixerClient(srv.address) as c:
        c.create_job(SPEC)
    srv.acked = []  # per ack of any stream: the (source, step, seq) it may stand for
    srv.calls = 0
    yield srv
    srv.kill()


def run_stream(address: str, frames_: list) -> tuple[grpc.StatusCode, list[pb.SessionResponse], str]:
    """Send the frames on one Session stream (raw bytes: garbage goes as is), half-close, read to the end."""
    with grpc.insecure_channel(address) as ch:
        call = ch.stream_stream(
            SESSION, request_serializer=None, response_deserializer=pb.SessionResponse.FromString
        )(
            iter([f if isinstance(f, bytes) else f.SerializeToString() for _, f in frames_]),
            timeout=CALL_SECONDS,
        )
        out = []
        try:
            out.extend(call)  # what came before an error stays in `out`
            return grpc.StatusCode.OK, out, ""
        except grpc.RpcError as e:
            return e.code(), out, e.details() or ""


def sent_keys(frames_: list) -> dict[tuple[int, int], frozenset[str]]:
    """(step, seq) -> the sources of the stream's reports with that key: an Ack names a report by
    (step, seq) only, so an ack on a stream that sent one key under several sources means one of them."""
    keys: dict[tuple[int, int], set[str]] = {}
    for kind, f in frames_:
        msgs = [f.report] if kind == "one" else f.reports.reports if kind == "batch" else []
        for m in msgs:
            keys.setdefault((m.step, m.seq), set()).add(m.source)
    return {k: frozenset(v) for k, v in keys.items()}


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(frames_=streams())
def test_any_framing_gets_a_clean_status(frame_server, frames_):
    code, responses, details = run_stream(frame_server.address, frames_)
    frame_server.calls += 1
    assert code in CLEAN, (code, details, frames_)
    if code != grpc.StatusCode.OK:
        assert details, "an error must say what was wrong"
    keys = sent_keys(frames_)
    for resp in responses:
        kind = resp.WhichOneof("kind")
        if kind == "nack":
            assert CODES.get(resp.nack.code) in CLEAN - {grpc.StatusCode.OK}, resp.nack
            assert resp.nack.message
        acks = [resp.ack] if kind == "ack" else list(resp.acks.acks) if kind == "acks" else []
        for a in acks:
            assert frames_[0][0] == "hello", f"an ack on a stream without a leading hello: {frames_}"
            assert (a.step, a.seq) in keys, f"an ack for a report never sent: {a}"
            frame_server.acked.append(frozenset((src, a.step, a.seq) for src in keys[a.step, a.seq]))


def test_concurrent_streams_of_one_source_interleave_cleanly(frame_server):
    """Two streams of one source at once, with overlapping keys in interleaved order: each report is
    taken once, acknowledged as a duplicate or refused as out of order, never stored twice."""
    with MixerClient(frame_server.address) as c:
        c.create_job({"name": "frames2", "domains": SPEC["domains"], "strategy": "odm"})
    hello = ("hello", pb.SessionRequest(hello=pb.Hello(job="frames2", source="w0")))
    evens = [
        (
            "batch",
            pb.SessionRequest(
                reports=pb.ReportBatch(reports=[signals(s, 0, "w0", True) for s in range(0, 24, 2)])
            ),
        )
    ]
    everything = [("one", pb.SessionRequest(report=signals(s, 0, "w0", True))) for s in range(24)]
    results: list = [None, None]

    def go(i, fs):
        results[i] = run_stream(frame_server.address, [hello, *fs])

    threads = [
        threading.Thread(target=go, args=(0, evens)),
        threading.Thread(target=go, args=(1, everything)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(CALL_SECONDS + 5)
    acked = set()
    for code, responses, details in results:
        assert code == grpc.StatusCode.OK, (code, details)
        for resp in responses:
            kind = resp.WhichOneof("kind")
            acked.update(
                (a.step, a.seq)
                for a in ([resp.ack] if kind == "ack" else resp.acks.acks if kind == "acks" else [])
            )
            if kind == "nack":
                # Below the source's last report and not in the log: refused as out of order.
                assert resp.nack.code == grpc.StatusCode.FAILED_PRECONDITION.value[0], resp.nack
    store = Store(frame_server.db)
    logged = [(s.step, s.source_seq) for s in store.signals(store.get_job("frames2").id)]
    store.close()
    assert len(logged) == len(set(logged)) and acked == set(logged), (sorted(acked), sorted(logged))
    assert {s for s, _ in logged} >= set(range(0, 24, 2))


def test_after_fuzzing_every_acknowledged_report_is_logged_once(frame_server):
    assert frame_server.proc.poll() is None, frame_server.log()
    with grpc.insecure_channel(frame_server.address) as ch:
        status = (
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
        )
    assert status == health_pb2.HealthCheckResponse.SERVING
    with MixerClient(frame_server.address) as c:  # still takes and serves reports
        c.report(JOB, signals(max(c.get_job(JOB).max_step, 0), 9, "after", True))
        assert c.get_weights(JOB).version >= 0
    store = Store(frame_server.db)
    logged = [(s.source, s.step, s.source_seq) for s in store.signals(store.get_job(JOB).id)]
    store.close()
    assert len(logged) == len(set(logged)), "a report is in the log twice"
    missing = [sorted(ack) for ack in frame_server.acked if not ack & set(logged)]
    assert not missing, f"acknowledged but not in the log: {missing[:10]}"
    assert frame_server.calls >= 20 and len(frame_server.acked) >= 40, (
        "the fuzzer hardly reached the log; widen the strategies"
    )
