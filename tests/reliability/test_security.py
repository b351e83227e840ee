"""Bearer tokens with roles, TLS and mutual TLS, and the loopback rule: real servers, real channels."""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest

from mixer.client import MixerClient, TlsConfig
from mixer.reporter import Reporter
from mixer.server.auth import create_token
from mixer.signals import Report
from mixer.store import Store
from tests.reliability.certs import make_pki

SPEC = {"name": "sec", "domains": ["a", "b"], "strategy": "odm"}


def report(step: int) -> Report:
    return Report(step=step, source="w", domain_loss_sum=np.array([1.0, 2.0]), domain_token_count=np.array([1.0, 1.0]))


@pytest.fixture
def secured(server_factory, db_url):
    """An --auth server with a job and tokens of each role, on SQLite and on PostgreSQL."""
    store = Store(db_url)
    admin = create_token(store, "*", "admin")
    store.close()
    srv = server_factory(db_url, "--auth")
    with MixerClient(srv.address, token=admin) as c:
        c.create_job(SPEC)
        c.create_job({**SPEC, "name": "other"})
    store = Store(db_url)
    toks = {
        "admin": admin,
        "writer": create_token(store, "sec", "writer"),
        "reader": create_token(store, "sec", "reader"),
        "other_writer": create_token(store, "other", "writer"),
        "global_reader": create_token(store, "*", "reader"),
    }
    store.close()
    return srv, toks


def code_of(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code()


def test_missing_and_wrong_tokens_are_unauthenticated(secured):
    srv, toks = secured
    with MixerClient(srv.address) as c:
        assert code_of(lambda: c.get_weights("sec")) == grpc.StatusCode.UNAUTHENTICATED
    with MixerClient(srv.address, token=toks["reader"][:-2] + "xx") as c:
        assert code_of(lambda: c.get_weights("sec")) == grpc.StatusCode.UNAUTHENTICATED
    with MixerClient(srv.address, token="not-a-token") as c:
        assert code_of(lambda: c.list_jobs()) == grpc.StatusCode.UNAUTHENTICATED


def test_roles_are_enforced(secured):
    srv, toks = secured
    with MixerClient(srv.address, token=toks["reader"]) as c:
        assert c.get_weights("sec").version == 0
        assert code_of(lambda: c.report("sec", report(0))) == grpc.StatusCode.PERMISSION_DENIED
        assert code_of(lambda: c.create_job({**SPEC, "name": "new"})) == grpc.StatusCode.PERMISSION_DENIED
        assert code_of(lambda: c.get_weights("other")) == grpc.StatusCode.PERMISSION_DENIED
        assert [j.name for j in c.list_jobs()] == ["sec"]
    with MixerClient(srv.address, token=toks["writer"]) as c:
        assert c.report("sec", report(0)).log_seq == 0
        assert c.get_job("sec").report_count == 1  # writer includes reader
        assert code_of(lambda: c.create_job({**SPEC, "name": "new"})) == grpc.StatusCode.PERMISSION_DENIED
    with MixerClient(srv.address, token=toks["other_writer"]) as c:
        assert code_of(lambda: c.report("sec", report(1))) == grpc.StatusCode.PERMISSION_DENIED
    with MixerClient(srv.address, token=toks["admin"]) as c:
        assert c.create_job({**SPEC, "name": "new"})[1]


def test_sessions_need_a_writer_token(secured):
    srv, toks = secured
    bad = Reporter(srv.address, "sec", "w", token=toks["reader"], max_backoff=0.2).start()
    bad.submit(report(5))
    assert not bad.flush(timeout=2)
    assert "PERMISSION_DENIED" in bad.last_error
    bad.close(timeout=0.1)
    good = Reporter(srv.address, "sec", "w", token=toks["writer"]).start()
    good.submit(report(5))
    assert good.close(timeout=30)


def test_http_side_honours_reader_tokens(secured):
    srv, toks = secured
    base = f"http://127.0.0.1:{srv.http_port}"

    def get(path, token=None):
        req = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            return urllib.request.urlopen(req, timeout=5).status
        except urllib.error.HTTPError as e:
            return e.code

    assert get("/healthz") == 200
    assert get("/metrics") == 401
    assert get("/metrics", toks["reader"]) == 403  # a job's token does not see every job
    assert get("/metrics", toks["global_reader"]) == 200
    assert get("/api/jobs/sec", toks["reader"]) == 200
    assert get("/api/jobs/other", toks["reader"]) == 403


def test_tokens_are_stored_hashed(secured):
    srv, toks = secured
    store = Store(srv.db, migrate=False)
    with store.engine.connect() as conn:
        rows = conn.exec_driver_sql("select id, secret_hash from tokens").fetchall()
    store.close()
    secrets = {t.split("_", 2)[2] for t in toks.values()}
    assert rows and not any(h in secrets for _, h in rows)


def test_tls_and_mutual_tls(server_factory, sqlite_url, tmp_path):
    pki = make_pki(tmp_path / "pki")
    srv = server_factory(sqlite_url, "--tls-cert", pki["server_cert"], "--tls-key", pki["server_key"])
    with MixerClient(srv.address, tls=TlsConfig(ca=pki["ca"])) as c:
        c.create_job(SPEC)
        assert c.get_weights("sec").version == 0
    with MixerClient(srv.address, timeout=3) as plain:
        assert code_of(lambda: plain.list_jobs()) == grpc.StatusCode.UNAVAILABLE
    srv.kill()

    mtls = server_factory(sqlite_url, "--tls-cert", pki["server_cert"], "--tls-key", pki["server_key"], "--tls-client-ca", pki["ca"])
    with MixerClient(mtls.address, tls=TlsConfig(ca=pki["ca"], cert=pki["client_cert"], key=pki["client_key"])) as c:
        assert c.get_weights("sec").version == 0
    with MixerClient(mtls.address, tls=TlsConfig(ca=pki["ca"]), timeout=3) as no_cert:
        assert code_of(lambda: no_cert.list_jobs()) == grpc.StatusCode.UNAVAILABLE
    other = make_pki(tmp_path / "other", "other")
    with MixerClient(mtls.address, tls=TlsConfig(ca=pki["ca"], cert=other["client_cert"], key=other["client_key"]), timeout=3) as stranger:
        assert code_of(lambda: stranger.list_jobs()) == grpc.StatusCode.UNAVAILABLE


def test_non_loopback_without_auth_is_refused(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "mixer.cli", "serve", "--db", str(tmp_path / "x.db"), "--host", "0.0.0.0", "--port", "0"],
        check=False, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode != 0
    assert "--insecure" in out.stderr


def test_token_cli_prints_once_and_checks_the_job(tmp_path):
    db = str(tmp_path / "t.db")
    ok = subprocess.run([sys.executable, "-m", "mixer.cli", "token", "create", "--job", "*", "--role", "admin", "--db", db], check=False, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout.startswith("mx_")
    bad = subprocess.run([sys.executable, "-m", "mixer.cli", "token", "create", "--job", "nope", "--role", "reader", "--db", db], check=False, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "'nope' not found" in bad.stderr
