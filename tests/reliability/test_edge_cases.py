"""Defined behaviour at the edges: Unicode and duplicate names, 10,000 domains, empty batches."""

from __future__ import annotations

import time
import urllib.request

import grpc
import numpy as np
import pytest

from mixer.client import MixerClient
from mixer.signals import Report


def test_unicode_domain_names_round_trip_and_escape_in_metrics(server):
    names = ["日本語", "español", 'quo"te', "back\\slash"]
    with MixerClient(server.address) as c:
        job, _ = c.create_job({"name": "uni", "domains": names, "strategy": "odm", "cadence": {"update_every": 1}})
        assert list(job.domains) == names
        c.report("uni", Report(step=0, source="w", domain_loss_sum=np.ones(4), domain_token_count=np.ones(4)))
        assert list(c.get_weights("uni").domains) == names
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/metrics", timeout=5).read().decode()
    assert 'domain="日本語"' in text and r'domain="quo\"te"' in text and r'domain="back\\slash"' in text


def test_duplicate_domain_names_are_refused_by_field(server):
    with MixerClient(server.address) as c, pytest.raises(grpc.RpcError) as err:
        c.create_job({"name": "dup", "domains": ["web", "code", "web"]})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "domains[2].name" in err.value.details() and "duplicate" in err.value.details()


@pytest.mark.slow
def test_ten_thousand_domains(server):
    k = 10_000
    with MixerClient(server.address, timeout=60) as c:
        c.create_job({"name": "wide", "domains": [f"d{i}" for i in range(k)], "strategy": "odm", "cadence": {"update_every": 1, "min_weight": 1e-5}})
        rng = np.random.default_rng(0)
        t0 = time.perf_counter()
        for step in range(5):
            c.report("wide", Report(step=step, source="w", domain_loss_sum=rng.uniform(1, 5, k), domain_token_count=np.ones(k)))
        per_report = (time.perf_counter() - t0) / 5
        v = c.get_weights("wide")
        assert len(v.weights) == k and v.version == 5
        assert abs(sum(v.weights) - 1) < 1e-9 and min(v.weights) >= 1e-5 - 1e-15
    assert per_report < 2.0, f"a report over 10,000 domains took {per_report:.2f}s"


def test_empty_batch_is_accepted_and_changes_nothing(server):
    with MixerClient(server.address) as c:
        c.create_job({"name": "empty", "domains": ["a", "b"], "strategy": "odm", "cadence": {"update_every": 1}})
        ack = c.report("empty", Report(step=0, source="w", domain_loss_sum=np.zeros(2), domain_token_count=np.zeros(2), domain_sample_count=np.zeros(2, dtype=np.int64)))
        assert not ack.duplicate
        ack2 = c.report("empty", Report(step=1, source="w"))  # no arrays at all: a heartbeat-like report
        assert ack2.log_seq == 1
        v = c.get_weights("empty")
        assert v.version == 0, "a window with no data must not make a version"
        assert v.weights.tolist() == [0.5, 0.5]


def test_domain_limit_is_a_clear_error(server_factory, sqlite_url):
    srv = server_factory(sqlite_url, "--max-domains", "100")
    with MixerClient(srv.address) as c, pytest.raises(grpc.RpcError) as err:
        c.create_job({"name": "toowide", "domains": [f"d{i}" for i in range(101)]})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit of 100" in err.value.details()


def test_session_limit_is_a_clear_error(server_factory, sqlite_url):
    from mixer.reporter import Reporter

    srv = server_factory(sqlite_url, "--max-sessions-per-job", "1")
    with MixerClient(srv.address) as c:
        c.create_job({"name": "one", "domains": ["a"]})
    first = Reporter(srv.address, "one", "w0").start()
    assert first.connected.wait(30)
    second = Reporter(srv.address, "one", "w1", max_backoff=0.2).start()
    time.sleep(1.5)
    assert not second.connected.is_set()
    assert "RESOURCE_EXHAUSTED" in second.last_error
    second.close(timeout=0.1)
    first.close()
