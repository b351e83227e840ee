"""Fuzzing the wire: any report or spec gets a clean status; the log only ever holds valid reports."""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mixer.bench.launch import ServerProcess
from mixer.client import MixerClient
from mixer.replay import verify
from mixer.signals import validate_report
from mixer.store import Store
from mixer.v1 import mixer_pb2 as pb
from mixer.wire import report_from_proto

K = 3
CLEAN = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
}

floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-10, 10), st.just(0.0))
domain_arrays = st.one_of(st.just([]), st.lists(floats, min_size=0, max_size=5), st.lists(st.floats(0, 100), min_size=K, max_size=K))
count_arrays = st.one_of(st.just([]), st.lists(st.integers(-5, 2**40), min_size=0, max_size=5), st.lists(st.integers(0, 50), min_size=K, max_size=K))
raw_bytes = st.one_of(st.just(b""), st.binary(max_size=64))


@st.composite
def signals(draw):
    n = draw(st.integers(0, 8))
    msg = pb.Signals(
        step=draw(st.integers(-3, 10_000)),
        source=draw(st.one_of(st.just("fuzz"), st.text(max_size=300))),
        seq=draw(st.integers(-2, 3)),
        applied_version=draw(st.integers(-3, 5)),
    )
    for name in ("domain_loss_sum", "domain_token_count", "excess_loss_sum", "val_loss", "alignment"):
        getattr(msg, name).extend(draw(domain_arrays))
    msg.domain_sample_count.extend(draw(count_arrays))
    if draw(st.booleans()):
        with np.errstate(over="ignore"):  # huge floats become inf in float32: that is part of the fuzz
            msg.sample_loss = np.asarray(draw(st.lists(floats, min_size=n, max_size=n)), dtype=np.float32).tobytes()
        msg.sample_domain = np.asarray(draw(st.lists(st.integers(-2, K + 1), min_size=n, max_size=n)), dtype=np.int32).tobytes()
    else:
        msg.sample_loss = draw(raw_bytes)
        msg.sample_id = draw(raw_bytes)
    for k, v in draw(st.dictionaries(st.text(max_size=8), floats, max_size=2)).items():
        msg.extra[k] = v
    return msg


spec_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True), st.text(max_size=20)),
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=10), children, max_size=4)),
    max_leaves=12,
)


@st.composite
def specs(draw):
    base = {"name": draw(st.one_of(st.just("fz"), st.text(max_size=20))), "domains": draw(st.one_of(st.just(["a", "b"]), spec_values))}
    for key in ("strategy", "cadence", "weighting", "unit", "seed", "data_path", "bogus"):
        if draw(st.booleans()):
            base[key] = draw(spec_values)
    return base


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    srv = ServerProcess(str(d / "mixer.db"), d).start()
    with MixerClient(srv.address) as c:
        c.create_job({"name": "fz", "domains": ["a", "b", "c"], "strategy": "odm", "cadence": {"update_every": 2}})
    yield srv
    srv.kill()


def call(fn) -> grpc.StatusCode:
    try:
        fn()
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        assert e.code() in CLEAN, (e.code(), e.details())
        assert e.details(), "an error must say what was wrong"
        return e.code()


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(msg=signals())
def test_any_report_gets_a_clean_status(fuzz_server, msg):
    with MixerClient(fuzz_server.address) as c:
        call(lambda: c.report("fz", msg))


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(spec=specs())
@example(spec={"name": "fz", "domains": ["a", "b"], "weighting": {"\U00010e2a": None}})  # once stalled the call
@example(spec={"name": "fz2", "domains": ["\ud800"]})
def test_any_spec_gets_a_clean_status(fuzz_server, spec):
    import json

    with MixerClient(fuzz_server.address) as c:
        try:
            text = json.dumps(spec)
        except (TypeError, ValueError):
            return
        code = call(lambda: c.stub.CreateJob(pb.CreateJobRequest(spec=text), timeout=10))
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS)


def test_after_fuzzing_the_log_holds_only_valid_reports(fuzz_server):
    assert fuzz_server.proc.poll() is None, fuzz_server.log()
    store = Store(fuzz_server.db)
    rec = store.get_job("fz")
    n = 0
    for s in store.signals(rec.id):
        # Raises if anything got in that today's ranges refuse (the upper bounds included).
        r = validate_report(report_from_proto(pb.Signals.FromString(s.payload)), 3)
        for name in ("domain_loss_sum", "domain_token_count", "excess_loss_sum", "alignment"):
            arr = getattr(r, name)
            assert arr is None or all(math.isfinite(x) for x in arr)
        n += 1
    assert verify(store, "fz").ok
    store.close()
    assert n >= 1, "the fuzzer never produced a valid report; widen the strategies"
