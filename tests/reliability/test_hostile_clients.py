"""Clients that hold resources or send garbage, revoked tokens, and serve's start-up refusals
(issue 20): real servers in subprocesses, real channels and sockets, loopback only."""

from __future__ import annotations

import queue
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest

from mixer.bench.launch import free_port
from mixer.client import MixerClient, TlsConfig, auth_metadata
from mixer.reporter import Reporter
from mixer.server.app import ServeConfig
from mixer.server.auth import CACHE_SECONDS, create_token
from mixer.signals import Report
from mixer.store import Store
from mixer.v1 import mixer_pb2 as pb
from mixer.v1 import mixer_pb2_grpc as pb_grpc
from mixer.wire import report_to_proto
from tests.reliability.certs import make_pki

SPEC = {"name": "hostile", "domains": ["a", "b"], "strategy": "odm"}
SESSION = "/mixer.v1.MixerService/Session"


def report(step: int) -> Report:
    return Report(step=step, source="w", domain_loss_sum=np.array([1.0, 2.0]), domain_token_count=np.array([1.0, 1.0]))


class Stream:
    """A raw Session stream: messages go in through a queue (None half-closes), nothing is sent unless put."""

    def __init__(self, address: str, token: str | None = None):
        self.channel = grpc.insecure_channel(address)
        grpc.channel_ready_future(self.channel).result(timeout=10)
        self.q: queue.Queue = queue.Queue()
        self.done = threading.Event()

        def requests():
            while (msg := self.q.get()) is not None:
                yield msg

        self.call = pb_grpc.MixerServiceStub(self.channel).Session(requests(), metadata=auth_metadata(token))
        self.call.add_done_callback(lambda _: self.done.set())

    def send(self, msg: pb.SessionRequest) -> None:
        self.q.put(msg)

    def ended_within(self, seconds: float) -> bool:
        return self.done.wait(seconds)

    def close(self) -> None:
        self.q.put(None)
        self.call.cancel()
        self.channel.close()


def hello(job: str = "hostile") -> pb.SessionRequest:
    return pb.SessionRequest(hello=pb.Hello(job=job, source="w"))


# --- streams that never say hello ------------------------------------------------------------


def test_a_stream_without_hello_is_closed_within_the_timeout(server_factory, sqlite_url):
    srv = server_factory(sqlite_url, "--hello-timeout", "1")
    silent = Stream(srv.address)
    t0 = time.monotonic()
    try:
        assert silent.ended_within(6), "a stream that never sent hello is still open"
        assert time.monotonic() - t0 < 4
        assert silent.call.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "hello" in silent.call.details() and "--hello-timeout" in silent.call.details()
    finally:
        silent.close()
    # A stream that says hello at once is unaffected, also past the timeout.
    with MixerClient(srv.address) as c:
        c.create_job(SPEC)
    r = Reporter(srv.address, "hostile", "w").start()
    assert r.connected.wait(30)
    time.sleep(1.5)
    r.submit(report(0))
    assert r.close(timeout=30)


def test_silent_streams_beyond_the_cap_are_refused(server_factory, sqlite_url):
    srv = server_factory(sqlite_url, "--max-pending-sessions", "3", "--hello-timeout", "60")
    with MixerClient(srv.address) as c:
        c.create_job(SPEC)
    silent = [Stream(srv.address) for _ in range(3)]
    try:
        time.sleep(1.0)  # the server has started all three
        assert not any(s.done.is_set() for s in silent)
        extra = Stream(srv.address)
        try:
            assert extra.ended_within(5), "a fourth silent stream was taken beyond --max-pending-sessions 3"
            assert extra.call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-pending-sessions" in extra.call.details()
        finally:
            extra.close()
        # One silent stream leaves: its slot serves an honest worker, whose session then frees it.
        silent.pop().close()
        time.sleep(0.5)
        r = Reporter(srv.address, "hostile", "w", max_backoff=0.2).start()
        assert r.connected.wait(10), r.last_error
        r.submit(report(0))
        assert r.close(timeout=30)
        # A session past hello no longer counts: a new silent stream fits again.
        again = Stream(srv.address)
        try:
            assert not again.ended_within(1)
        finally:
            again.close()
    finally:
        for s in silent:
            s.close()


# --- slow HTTP clients -----------------------------------------------------------------------


def _half_sent(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # no blank line: the request never ends
    return s


def _closed_by_server(s: socket.socket, within: float) -> bool:
    s.settimeout(within)
    try:
        while chunk := s.recv(4096):
            del chunk
        return True
    except TimeoutError:
        return False
    except OSError:
        return True


def _get(url: str, context: ssl.SSLContext | None = None) -> int:
    try:
        return urllib.request.urlopen(url, timeout=5, context=context).status
    except urllib.error.HTTPError as e:
        return e.code


def test_half_sent_http_requests_neither_block_others_nor_stay(server_factory, sqlite_url):
    # 3 s: long enough that the first slow connections still hold their slots on a loaded machine.
    srv = server_factory(sqlite_url, "--http-timeout", "3", "--http-max-connections", "4")
    url = f"http://127.0.0.1:{srv.http_port}/healthz"
    slow = [_half_sent(srv.http_port) for _ in range(2)]
    assert _get(url) == 200  # below the cap: answered while the slow ones wait
    slow += [_half_sent(srv.http_port) for _ in range(2)]
    # At the cap: one more connection is answered 503 at once, not left waiting. (A loaded server
    # may take a moment to accept the slow ones; until it has, it still answers 200.)
    deadline = time.monotonic() + 1.5
    while True:
        t0 = time.monotonic()
        status = _get(url)
        took = time.monotonic() - t0
        if status == 503 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert status == 503
    assert took < 2
    # The slow ones are dropped after --http-timeout; then the HTTP side answers again.
    assert all(_closed_by_server(s, 10) for s in slow), "a half-sent request still holds its connection"
    for s in slow:
        s.close()
    assert _get(url) == 200


# --- bytes that are not a protobuf -----------------------------------------------------------

GARBAGE = b"\x0a\x05ab"  # field 1, length 5, then two bytes


@pytest.mark.parametrize("method, type_name", [("GetJob", "GetJobRequest"), ("Report", "ReportRequest"), ("CreateJob", "CreateJobRequest")])
def test_unary_garbage_is_invalid_argument(server, method, type_name):
    with grpc.insecure_channel(server.address) as ch, pytest.raises(grpc.RpcError) as err:
        ch.unary_unary(f"/mixer.v1.MixerService/{method}")(GARBAGE, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert f"mixer.v1.{type_name}" in err.value.details() and "not a" in err.value.details()


def test_stream_garbage_is_invalid_argument(server):
    with MixerClient(server.address) as c:
        c.create_job(SPEC)
    with grpc.insecure_channel(server.address) as ch:
        watch = ch.unary_stream("/mixer.v1.MixerService/WatchWeights")(GARBAGE, timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            next(watch)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "mixer.v1.WatchWeightsRequest" in err.value.details()

        first = ch.stream_stream(SESSION)(iter([GARBAGE]), timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            next(first)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "mixer.v1.SessionRequest" in err.value.details()

        # Garbage after hello ends the session with INVALID_ARGUMENT, after what was taken is acknowledged.
        good = pb.SessionRequest(report=report_to_proto(report(0))).SerializeToString()
        later = ch.stream_stream(SESSION, response_deserializer=pb.SessionResponse.FromString)(
            iter([hello().SerializeToString(), good, GARBAGE]), timeout=10
        )
        got = []
        with pytest.raises(grpc.RpcError) as err:
            for msg in later:
                got.append(msg.WhichOneof("kind"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert got[0] == "welcome" and "ack" in got
    with MixerClient(server.address) as c:
        assert c.get_job("hostile").report_count == 1


# --- revocation ends open sessions -----------------------------------------------------------


def test_revoking_a_token_ends_its_open_session(server_factory, sqlite_url):
    store = Store(sqlite_url)
    admin = create_token(store, "*", "admin")
    store.close()
    srv = server_factory(sqlite_url, "--auth")
    with MixerClient(srv.address, token=admin) as c:
        c.create_job(SPEC)
    out = subprocess.run(
        [sys.executable, "-m", "mixer.cli", "token", "create", "--job", "hostile", "--role", "writer", "--db", sqlite_url],
        capture_output=True, text=True, timeout=60, check=True,
    )
    writer = out.stdout.strip()
    stream = Stream(srv.address, token=writer)
    responses = iter(stream.call)
    try:
        stream.send(hello())
        assert next(responses).WhichOneof("kind") == "welcome"
        stream.send(pb.SessionRequest(report=report_to_proto(report(0))))
        assert next(responses).WhichOneof("kind") == "ack"

        token_id = writer.split("_")[1]
        subprocess.run([sys.executable, "-m", "mixer.cli", "token", "revoke", token_id, "--db", sqlite_url], capture_output=True, timeout=60, check=True)
        revoked = time.monotonic()
        guard = threading.Timer(CACHE_SECONDS + 10, stream.call.cancel)  # the unfixed server never ends it
        guard.start()

        def keep_reporting():
            step = 1
            while not stream.done.wait(0.25):
                stream.send(pb.SessionRequest(report=report_to_proto(report(step))))
                step += 1

        threading.Thread(target=keep_reporting, daemon=True).start()
        with pytest.raises(grpc.RpcError) as err:
            for _ in responses:
                pass
        guard.cancel()
        elapsed = time.monotonic() - revoked
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value.details()
        assert "revoked" in err.value.details() and token_id in err.value.details()
        # Within one cache period (+ slack for a loaded machine), like the token's new calls.
        assert elapsed <= CACHE_SECONDS + 3, f"the session ended {elapsed:.1f}s after revocation"
    finally:
        stream.close()
    # New calls and new sessions with the token are refused.
    with MixerClient(srv.address, token=writer) as c, pytest.raises(grpc.RpcError) as err:
        c.report("hostile", report(100))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    again = Stream(srv.address, token=writer)
    try:
        again.send(hello())
        assert again.ended_within(10) and again.call.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        again.close()


# --- start-up refusals -----------------------------------------------------------------------


def _serve(db: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mixer.cli", "serve", "--db", db, "--port", str(free_port()), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.parametrize("option", ["--http-port", "--port"])
def test_busy_port_is_one_clear_line(tmp_path, option):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        ports = {"--port": str(free_port()), "--http-port": str(free_port()), option: str(port)}
        cmd = [sys.executable, "-m", "mixer.cli", "serve", "--db", str(tmp_path / "m.db"), *(x for kv in ports.items() for x in kv)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert option in last and str(port) in last, out.stderr
    if option == "--http-port":  # (a busy gRPC port also gets gRPC core's own log lines before it)
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_a_second_server_on_one_sqlite_file_is_refused(server_factory, sqlite_url):
    first = server_factory(sqlite_url)
    with MixerClient(first.address) as c:
        c.create_job(SPEC)
    out = _serve(sqlite_url, "--http-port", str(free_port()))
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr
    assert "in use by another mixer server" in out.stderr and f"pid {first.proc.pid}" in out.stderr, out.stderr
    with MixerClient(first.address) as c:  # the first keeps serving
        c.report("hostile", report(0))
        assert c.get_job("hostile").report_count == 1
    first.kill()  # a killed server leaves its lock file, but not its lock
    second = server_factory(sqlite_url)
    with MixerClient(second.address) as c:
        assert c.get_job("hostile").report_count == 1


# --- HTTPS -----------------------------------------------------------------------------------


def test_http_side_serves_https_with_the_grpc_certificate(server_factory, sqlite_url, tmp_path):
    pki = make_pki(tmp_path / "pki")
    srv = server_factory(sqlite_url, "--tls-cert", pki["server_cert"], "--tls-key", pki["server_key"])
    assert "https=" in srv.log()
    ctx = ssl.create_default_context(cafile=pki["ca"])
    assert _get(f"https://127.0.0.1:{srv.http_port}/healthz", ctx) == 200
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://127.0.0.1:{srv.http_port}/healthz", timeout=5)
    with MixerClient(srv.address, tls=TlsConfig(ca=pki["ca"])) as c:  # gRPC unchanged
        c.create_job(SPEC)
    # A client that never finishes its handshake is dropped like a slow one, and blocks nobody.
    stuck = socket.create_connection(("127.0.0.1", srv.http_port), timeout=10)
    try:
        assert _get(f"https://127.0.0.1:{srv.http_port}/api/jobs/hostile", ctx) == 200
    finally:
        stuck.close()
    srv.kill()
    # Mutual TLS: the HTTP side asks for a client certificate from the same CA too.
    mtls = server_factory(sqlite_url, "--tls-cert", pki["server_cert"], "--tls-key", pki["server_key"], "--tls-client-ca", pki["ca"])
    with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
        urllib.request.urlopen(f"https://127.0.0.1:{mtls.http_port}/healthz", timeout=5, context=ctx)
    ctx.load_cert_chain(pki["client_cert"], pki["client_key"])
    assert _get(f"https://127.0.0.1:{mtls.http_port}/healthz", ctx) == 200


def test_public_address_with_auth_but_without_tls_warns(tmp_path):
    warnings = ServeConfig(db=str(tmp_path / "m.db"), host="0.0.0.0", auth=True).validate()
    assert len(warnings) == 1 and "without TLS" in warnings[0] and "--tls-cert" in warnings[0]
    assert ServeConfig(db=str(tmp_path / "m.db"), host="127.0.0.1", auth=True).validate() == []
