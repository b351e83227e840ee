"""gRPC connections that never open a call: closed after the handshake or idle timeout, capped in
number. Real servers in subprocesses and real TCP sockets speaking (or not speaking) HTTP/2."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from mixer.client import MixerClient
from mixer.config import ConfigError, check
from mixer.reporter import Reporter
from mixer.server.app import ServeConfig
from mixer.signals import Report
from tests.reliability.configured import ConfiguredServer

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS = struct.pack(">I", 0)[1:] + bytes([0x4, 0x0]) + struct.pack(">I", 0)  # an empty SETTINGS frame
GOAWAY = 0x7
SETTINGS_TYPE = 0x4
SPEC = {"name": "conns", "domains": ["a", "b"], "strategy": "odm"}


def frames_until_closed(sock: socket.socket, within: float) -> tuple[list[int], float | None]:
    """Read HTTP/2 frames until the server closes the connection: (frame types, seconds until closed, or None)."""
    t0 = time.monotonic()
    sock.settimeout(0.2)
    buf, types = b"", []
    while time.monotonic() - t0 < within:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return types, time.monotonic() - t0
        if not data:
            return types, time.monotonic() - t0
        buf += data
        while len(buf) >= 9:
            length = int.from_bytes(buf[:3], "big")
            if len(buf) < 9 + length:
                break
            types.append(buf[3])
            buf = buf[9 + length :]
    return types, None


def first_frame(sock: socket.socket, within: float) -> int | None:
    """The type of the first HTTP/2 frame the server sends (None: nothing within the time)."""
    sock.settimeout(within)
    head = b""
    try:
        while len(head) < 9:
            data = sock.recv(9 - len(head))
            if not data:
                return None
            head += data
        length = int.from_bytes(head[:3], "big")
        while length:
            length -= len(sock.recv(length))
    except TimeoutError:
        return None
    return head[3]


def open_connections(port: int) -> int:
    """Established TCP connections to 127.0.0.1:port, the server's side of each (from /proc/net/tcp)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if state == "01" and local == f"0100007F:{port:04X}":
            count += 1
    return count


def connect(srv, speak: bool) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    if speak:
        sock.sendall(PREFACE + SETTINGS)
    return sock


@pytest.fixture
def started():
    servers: list[ConfiguredServer] = []
    yield servers
    for srv in servers:
        srv.kill()


def serve(started, tmp_path, **fields) -> ConfiguredServer:
    srv = ConfiguredServer(str(tmp_path / "mixer.db"), tmp_path, **fields)
    started.append(srv)
    return srv.start()


def test_a_silent_connection_is_closed_after_the_handshake_timeout(started, tmp_path):
    handshake = 1.0
    srv = serve(started, tmp_path, grpc_handshake_timeout=handshake)
    silent = connect(srv, speak=False)
    try:
        _, closed = frames_until_closed(silent, within=handshake + 5)
    finally:
        silent.close()
    assert closed is not None, "a connection that never sent the HTTP/2 preface is still open"
    assert closed >= handshake * 0.5, f"closed after {closed:.2f}s, before the handshake timeout"
    with MixerClient(srv.address, timeout=5) as c:  # the server still serves
        c.create_job(SPEC)


def test_a_connection_without_calls_gets_goaway_after_the_idle_timeout(started, tmp_path):
    handshake, idle = 1.0, 2.5
    srv = serve(started, tmp_path, grpc_handshake_timeout=handshake, grpc_idle_timeout=idle)
    quiet = connect(srv, speak=True)
    try:
        types, closed = frames_until_closed(quiet, within=idle + 6)
    finally:
        quiet.close()
    assert closed is not None, "a connection that never opened a call is still open"
    assert GOAWAY in types, f"closed without GOAWAY (frames {types})"
    assert closed > handshake, f"closed after {closed:.2f}s: by the handshake timeout, not the idle one"


def test_idle_timeouts_do_not_disturb_real_clients(started, tmp_path):
    idle = 1.0
    srv = serve(started, tmp_path, grpc_idle_timeout=idle)
    with MixerClient(srv.address, timeout=5) as c:
        c.create_job(SPEC)
        time.sleep(idle * 2.5)  # the server has closed this channel's connection by now
        assert c.get_job("conns").report_count == 0  # the channel reconnects by itself
    rep = Reporter(srv.address, "conns", "w").start()
    try:
        assert rep.connected.wait(10)
        time.sleep(idle * 2.5)  # an open Session stream is a call: its connection is not idle
        rep.submit(
            Report(
                step=0,
                source="w",
                domain_loss_sum=np.array([1.0, 2.0]),
                domain_token_count=np.array([1.0, 1.0]),
            )
        )
        assert rep.flush(10)
        assert rep.acked == 1 and not rep.last_error, rep.last_error
    finally:
        rep.close()


def test_connections_beyond_the_cap_are_refused(started, tmp_path):
    cap = 4
    srv = serve(started, tmp_path, grpc_max_connections=cap, grpc_idle_timeout=60.0)
    deadline = time.monotonic() + 10
    while open_connections(srv.port):  # the start-up health check's connection may still be closing
        assert time.monotonic() < deadline, "the server still has connections nobody holds"
        time.sleep(0.05)
    held: list[socket.socket] = []
    try:
        while len(held) < cap:  # each is counted once the server has set it up and sent its SETTINGS
            sock = connect(srv, speak=True)
            if first_frame(sock, within=10) == SETTINGS_TYPE:
                held.append(sock)
                continue
            # Refused below the cap: a connection that closed (the start-up health check's) may
            # still count until the server's transport has processed the close; a loaded machine
            # delays that. Try again until a deadline.
            sock.close()
            assert time.monotonic() < deadline + 10, f"the server refused connection {len(held) + 1} of {cap}"
            time.sleep(0.2)
        extra = connect(srv, speak=True)
        try:
            _, closed = frames_until_closed(extra, within=5)
        finally:
            extra.close()
        assert closed is not None and closed < 3, "a connection beyond the cap was kept open"
        for sock in held:  # those under the cap are untouched: nothing more comes, they stay open
            sock.settimeout(0.05)
            with pytest.raises(TimeoutError):
                while sock.recv(65536):
                    pass
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 10
    while True:  # once they are gone, a real client is served again
        try:
            with MixerClient(srv.address, timeout=2) as c:
                c.create_job(SPEC)
            break
        except grpc.RpcError:
            assert time.monotonic() < deadline, (
                "the server did not serve again after the held connections closed"
            )
            time.sleep(0.2)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"grpc_handshake_timeout": 0},
            "grpc_handshake_timeout (--grpc-handshake-timeout): must be in (0, 86400] seconds, got 0",
        ),
        (
            {"grpc_idle_timeout": 1e9},
            "grpc_idle_timeout (--grpc-idle-timeout): must be in (0, 86400] seconds, got 1000000000.0",
        ),
        (
            {"grpc_max_connections": 0},
            "grpc_max_connections (--grpc-max-connections): must be in [1, 1000000], got 0",
        ),
    ],
)
def test_bad_connection_limits_are_refused_by_name(fields, message):
    with pytest.raises(ConfigError) as err:
        check(ServeConfig(**fields))
    assert message in str(err.value)
