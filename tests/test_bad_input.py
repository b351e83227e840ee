"""Bad input gets a clear status naming the field, and nothing of it reaches the log."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from mixer.bench.launch import ServerProcess
from mixer.client import MixerClient
from mixer.signals import Report
from mixer.store import Store
from mixer.v1 import mixer_pb2 as pb
from mixer.wire import report_to_proto

K = 3


def good(step: int, source: str = "w", **override) -> Report:
    r = Report(
        step=step,
        source=source,
        domain_loss_sum=np.array([10.0, 20.0, 30.0]),
        domain_token_count=np.array([10.0, 10.0, 10.0]),
        domain_sample_count=np.array([1, 1, 1]),
        sample_loss=np.array([1.0, 2.0, 3.0], dtype=np.float32),
        sample_domain=np.array([0, 1, 2], dtype=np.int32),
    )
    for k, v in override.items():
        setattr(r, k, v)
    return r


@pytest.fixture(scope="module")
def srv(tmp_path_factory, module_db_url):
    """One server for the module, on SQLite and then on PostgreSQL."""
    d = tmp_path_factory.mktemp("bad")
    s = ServerProcess(module_db_url, d, ["--max-samples-per-report", "1000", "--max-message-bytes", str(1 << 20)]).start()
    with MixerClient(s.address) as c:
        c.create_job({"name": "bad", "domains": ["a", "b", "c"], "strategy": "odm", "cadence": {"max_step_lag": 100}})
        for step in range(0, 300, 50):
            c.report("bad", good(step))
    yield s
    s.kill()


@pytest.fixture
def client(srv):
    with MixerClient(srv.address) as c:
        yield c


def log_keys(srv) -> list[tuple]:
    store = Store(srv.db, migrate=False)
    try:
        rec = store.get_job("bad")
        return [(s.seq, s.step, s.source, s.source_seq) for s in store.signals(rec.id)]
    finally:
        store.close()


def refused(srv, client, msg: pb.Signals | Report, code: grpc.StatusCode, *needles: str, job: str = "bad") -> None:
    before = log_keys(srv)
    with pytest.raises(grpc.RpcError) as err:
        client.report(job, msg)
    assert err.value.code() == code, err.value.details()
    for needle in needles:
        assert needle in err.value.details(), err.value.details()
    assert log_keys(srv) == before, "a refused report changed the log"


def test_unknown_job_is_not_found(srv, client):
    refused(srv, client, good(400), grpc.StatusCode.NOT_FOUND, "'nope'", job="nope")
    with pytest.raises(grpc.RpcError) as err:
        client.get_weights("nope")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_nan_loss_is_invalid(srv, client):
    refused(srv, client, good(400, domain_loss_sum=np.array([1.0, np.nan, 1.0])), grpc.StatusCode.INVALID_ARGUMENT, "domain_loss_sum", "index 1")


def test_inf_sample_loss_is_invalid(srv, client):
    refused(srv, client, good(400, sample_loss=np.array([1.0, np.inf, 1.0], dtype=np.float32)), grpc.StatusCode.INVALID_ARGUMENT, "sample_loss", "non-finite")


def test_negative_count_is_invalid(srv, client):
    refused(srv, client, good(400, domain_sample_count=np.array([1, -2, 1])), grpc.StatusCode.INVALID_ARGUMENT, "domain_sample_count", ">= 0")


def test_domain_array_length_mismatch_is_invalid(srv, client):
    refused(srv, client, good(400, domain_token_count=np.array([1.0, 1.0])), grpc.StatusCode.INVALID_ARGUMENT, "domain_token_count", "3 domains")


def test_sample_array_length_mismatch_is_invalid(srv, client):
    refused(srv, client, good(400, sample_domain=np.array([0, 1], dtype=np.int32)), grpc.StatusCode.INVALID_ARGUMENT, "sample_domain", "2 entries")


def test_domain_index_out_of_range_is_invalid(srv, client):
    refused(srv, client, good(400, sample_domain=np.array([0, 1, 7], dtype=np.int32)), grpc.StatusCode.INVALID_ARGUMENT, "sample_domain", "out of range")


def test_step_far_behind_the_log_is_invalid(srv, client):
    refused(srv, client, good(10, source="late"), grpc.StatusCode.INVALID_ARGUMENT, "step", "max_step_lag")


def test_too_many_samples_is_invalid(srv, client):
    n = 5000
    r = good(400, sample_loss=np.ones(n, dtype=np.float32), sample_domain=np.zeros(n, dtype=np.int32))
    refused(srv, client, r, grpc.StatusCode.INVALID_ARGUMENT, "sample_loss", "at most 1000")


def test_oversized_message_is_refused_cleanly(srv, client):
    r = good(400)
    msg = report_to_proto(r)
    msg.sample_id = b"\0" * (2 << 20)  # beyond the server's 1 MiB message limit
    refused(srv, client, msg, grpc.StatusCode.RESOURCE_EXHAUSTED)


def test_ragged_sample_bytes_are_invalid(srv, client):
    msg = report_to_proto(good(400))
    msg.sample_loss = b"\0" * 10
    refused(srv, client, msg, grpc.StatusCode.INVALID_ARGUMENT, "sample_loss", "whole number")


def test_out_of_order_step_is_refused(srv, client):
    refused(srv, client, good(230), grpc.StatusCode.FAILED_PRECONDITION, "out of order")


def test_duplicate_is_acknowledged_and_dropped(srv, client):
    before = log_keys(srv)
    resp = client.report("bad", good(250))
    assert resp.duplicate
    assert log_keys(srv) == before


def test_bad_spec_names_the_field(srv, client):
    with pytest.raises(grpc.RpcError) as err:
        client.create_job({"name": "x", "domains": ["a"], "strategy": {"name": "nosuch"}})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "strategy.name" in err.value.details() and "odm" in err.value.details()


def test_same_name_different_spec_already_exists(srv, client):
    with pytest.raises(grpc.RpcError) as err:
        client.create_job({"name": "bad", "domains": ["a", "b"], "strategy": "odm"})
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    job, created = client.create_job({"name": "bad", "domains": ["a", "b", "c"], "strategy": "odm", "cadence": {"max_step_lag": 100}})
    assert not created and job.name == "bad"


@pytest.mark.parametrize(
    "ask", [{"step": -1}, {"step": 1 << 53}, {"step": 1 << 70}, {"version": -1}, {"version": 1 << 64}]
)
def test_get_weights_out_of_range_is_refused_by_name_before_the_call(client, ask):
    """A step or version outside [0, 2^53) never reaches the wire (where protobuf would refuse it
    with an unnamed 'Value out of range', or the server with a generic status)."""
    with pytest.raises(ValueError) as err:
        client.get_weights("bad", **ask)
    name, value = next(iter(ask.items()))
    assert f"{name}: must be in [0, 2^53), got {value}" in str(err.value)


@pytest.mark.parametrize(
    "argv",
    [
        ["replay", "bad", "--verify", "--db", "postgresql://nobody@127.0.0.1:1/none"],
        ["token", "create", "--job", "bad", "--role", "reader", "--db", "postgresql://nobody@127.0.0.1:1/none"],
        ["serve", "--db", "postgresql://nobody@127.0.0.1:1/none", "--port", "0"],
    ],
    ids=["replay", "token", "serve"],
)
def test_an_unreachable_database_is_an_error_message_not_a_traceback(argv):
    from click.testing import CliRunner

    from mixer.cli import main

    res = CliRunner().invoke(main, argv)
    assert res.exit_code == 1, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    assert "the database failed (OperationalError)" in res.output and "port 1 failed" in res.output, res.output


@pytest.mark.parametrize(
    ("method", "request_", "named"),
    [
        ("ListVersions", pb.ListVersionsRequest(job="bad", limit=-1), "limit: must be >= 0"),
        ("ListVersions", pb.ListVersionsRequest(job="bad", after_version=-2), "after_version: must be >= -1"),
        ("WatchWeights", pb.WatchWeightsRequest(job="bad", after_version=-2), "after_version: must be >= -1"),
    ],
)
def test_version_listing_arguments_out_of_range_are_invalid_by_name(client, method, request_, named):
    """A negative limit reached PostgreSQL as LIMIT -1 and came back as 'the database is
    unavailable; retry later': an argument is refused as one, by name, on both databases."""
    with pytest.raises(grpc.RpcError) as err:
        call = getattr(client.stub, method)(request_, timeout=10)
        if method == "WatchWeights":
            next(iter(call))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert named in err.value.details()


@pytest.mark.parametrize(
    ("call", "named"),
    [
        (lambda c: c.list_versions("bad", limit=-1), "limit: must be in [0, 2^31)"),
        (lambda c: c.list_versions("bad", limit=1 << 31), "limit: must be in [0, 2^31)"),
        (lambda c: c.list_versions("bad", after=-2), "after: must be in [-1, 2^53)"),
        (lambda c: next(c.watch("bad", after=1 << 60)), "after: must be in [-1, 2^53)"),
    ],
)
def test_client_version_listing_arguments_out_of_range_are_refused_by_name(client, call, named):
    with pytest.raises(ValueError) as err:
        call(client)
    assert named in str(err.value)


def test_a_folder_the_system_refuses_is_an_error_message_not_a_traceback(tmp_path):
    from click.testing import CliRunner

    from mixer.cli import main

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    res = CliRunner().invoke(main, ["demo", "--workdir", str(blocker / "work")])
    assert res.exit_code == 1, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert f"Not a directory: {blocker / 'work'}" in res.output, res.output


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (lambda R, C: R("", "j", "s"), "address: give host:port"),
        (lambda R, C: R(" , ", "j", "s"), "address: give host:port"),
        (lambda R, C: R("127.0.0.1:1", "", "s"), "job: a non-empty name is required"),
        (lambda R, C: R("127.0.0.1:1", "j", ""), "source: a non-empty name is required"),
        (lambda R, C: R("127.0.0.1:1", "j", "s", max_buffer=0), "max_buffer: must be an integer in [1, "),
        (lambda R, C: R("127.0.0.1:1", "j", "s", max_buffer=2.5), "max_buffer: must be an integer in [1, "),
        (lambda R, C: R("127.0.0.1:1", "j", "s", max_backoff=0), "max_backoff: must be in (0, "),
        (lambda R, C: R("127.0.0.1:1", "j", "s", max_backoff=float("nan")), "max_backoff: must be in (0, "),
        (lambda R, C: C("127.0.0.1:1", timeout=0), "timeout: must be in (0, "),
        (lambda R, C: C("127.0.0.1:1", timeout=float("nan")), "timeout: must be in (0, "),
        (lambda R, C: C("127.0.0.1:1", timeout=-1), "timeout: must be in (0, "),
    ],
)
def test_client_and_reporter_settings_out_of_range_are_refused_by_name(make, named):
    """A training job's client settings are checked where they are given, not found out later
    as a reporter that never connects, or one that retries without pause."""
    from mixer.reporter import Reporter

    with pytest.raises(ValueError) as err:
        make(Reporter, MixerClient)
    assert named in str(err.value)
