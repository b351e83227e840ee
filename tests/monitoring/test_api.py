"""The JSON behind the page, derived jobs, and reader tokens on the HTTP side (real server, no browser)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import pytest

from mixer.client import MixerClient
from mixer.server.auth import create_token
from mixer.signals import Report
from mixer.store import Store
from tests.monitoring.conftest import store_derived

SPEC = {"name": "api", "domains": ["a", "b", "c"], "strategy": "odm", "cadence": {"update_every": 5}}


@pytest.fixture
def server(server_on_each_db):
    """Every test here runs on SQLite and on PostgreSQL."""
    return server_on_each_db


def get(server, path: str, token: str | None = None) -> tuple[int, dict | bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{server.http_port}{path}", headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read()
            return r.status, json.loads(body) if r.headers.get_content_type() == "application/json" else body
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def report(step: int, source: str = "w", applied: int = -1) -> Report:
    return Report(step=step, source=source, applied_version=applied, domain_loss_sum=np.array([10.0, 40.0, 20.0]) * (1 + step),
                  domain_token_count=np.array([10.0, 10.0, 10.0]), domain_sample_count=np.array([2, 2, 2]))


def test_versions_loss_and_derived_jobs(server):
    with MixerClient(server.address) as c:
        c.create_job(SPEC)
        applied = -1
        for s in range(20):
            c.report("api", report(s, applied=applied))
            applied = c.get_weights("api").version if s % 5 == 2 else applied
        c.report("api", report(19, source="other"))  # a second rank at the same step
    status, jobs = get(server, "/api/jobs")
    assert status == 200 and [j["name"] for j in jobs["jobs"]] == ["api"]
    job = get(server, "/api/jobs/api")[1]
    assert job["version"] == 4 and job["domains"] == ["a", "b", "c"] and job["loaded"] and job["reports"] == 21

    vs = get(server, "/api/jobs/api/versions")[1]["versions"]
    assert [v["version"] for v in vs] == [0, 1, 2, 3, 4] and [v["effective_step"] for v in vs] == [0, 5, 10, 15, 20]
    # Version v was first reported as applied at step 5v + 3 (the loop polls at steps 2, 7, 12, ...).
    assert [v["applied_step"] for v in vs] == [3, 8, 13, 18, None]
    assert [v["applied_lag_steps"] for v in vs] == [3, 3, 3, 3, None]
    assert [v["version"] for v in get(server, "/api/jobs/api/versions?after=2")[1]["versions"]] == [3, 4]
    assert [v["version"] for v in get(server, "/api/jobs/api/versions?tail=2")[1]["versions"]] == [3, 4]
    one = get(server, "/api/jobs/api/versions/2")[1]
    assert one["version"] == 2 and abs(sum(one["weights"]) - 1) < 1e-12

    loss = get(server, "/api/jobs/api/loss")[1]
    assert [p["step"] for p in loss["points"]] == list(range(20)) and loss["reset"]
    last = loss["points"][-1]
    assert last["tokens"] == [20.0, 20.0, 20.0] and last["loss_sum"] == [400.0, 1600.0, 800.0]  # both ranks of step 19
    more = get(server, f"/api/jobs/api/loss?after_seq={loss['next_seq']}")[1]
    assert more["points"] == [] and not more["reset"] and more["next_seq"] == loss["next_seq"]
    assert get(server, "/api/jobs/api/loss?after_seq=999")[1]["reset"]  # ahead of this log: start over
    tail = get(server, "/api/jobs/api/loss?limit=4")[1]
    assert [p["step"] for p in tail["points"]] == [17, 18, 19] and tail["reset"]

    derived = store_derived(server.db, "api-static", source="api", domains=SPEC["domains"])
    listed = {j["name"]: j for j in get(server, "/api/jobs")[1]["jobs"]}
    d = listed["api-static"]
    assert d["source_job"] == "api" and not d["loaded"] and d["version"] == 3 and d["weights"] == derived[-1].weights.tolist()
    dvs = get(server, "/api/jobs/api-static/versions")[1]["versions"]
    assert [v["effective_step"] for v in dvs] == [0, 7, 14, 21]
    top = dvs[0]["topic_weights_top"]
    assert len(top) == 10 and top[0] == [0, 2.0] and dvs[0]["num_topics"] == 50 and dvs[0]["params"] == {"temperature": 2.0}
    assert len(get(server, "/api/jobs/api-static/versions/1")[1]["params"]["topic_weights"]) == 50
    dloss = get(server, "/api/jobs/api-static/loss")[1]
    assert dloss["log_job"] == "api" and len(dloss["points"]) == 20

    assert get(server, "/api/jobs/nope")[0] == 404
    assert get(server, "/api/jobs/api/versions/99")[0] == 404
    status, err = get(server, "/api/jobs/api/loss?limit=x")
    assert status == 400 and "limit" in err["error"]
    status, html = get(server, "/jobs/api")
    assert status == 200 and b'data-job="api"' in html


@pytest.fixture
def auth_server(server_factory, db_url):
    srv = server_factory(db_url, "--auth")
    store = Store(db_url)
    admin = create_token(store, "*", "admin")
    with MixerClient(srv.address, token=admin) as c:
        for name in ("api", "other"):
            c.create_job({**SPEC, "name": name})
            for s in range(6):
                c.report(name, report(s))
    tokens = {"admin": admin, "api": create_token(store, "api", "reader"), "other": create_token(store, "other", "reader")}
    store.close()
    return srv, tokens


def test_reader_tokens_guard_the_json_and_metrics_but_not_the_empty_page(auth_server):
    srv, tok = auth_server
    # The page shells hold no data; everything they show comes from the API below.
    for path in ("/", "/jobs/api"):
        status, html = get(srv, path)
        assert status == 200 and b"odm" not in html and not any(t.encode() in html for t in tok.values())
    assert get(srv, "/healthz")[0] == 200
    for path in ("/api/jobs", "/api/jobs/api", "/api/jobs/api/versions", "/api/jobs/api/loss", "/metrics"):
        status, body = get(srv, path)
        assert status == 401 and "bearer token" in body["error"], (path, body)
    for path in ("/api/jobs/api", "/api/jobs/api/versions", "/api/jobs/api/versions/1", "/api/jobs/api/loss"):
        assert get(srv, path, tok["api"])[0] == 200, path
        status, body = get(srv, path, tok["other"])
        assert status == 403 and "'api'" in body["error"], (path, body)
    assert get(srv, "/api/jobs", tok["api"])[0] == 403  # spans jobs: needs a '*' token
    assert get(srv, "/metrics", tok["api"])[0] == 403
    assert get(srv, "/api/jobs", tok["admin"])[0] == 200
    assert get(srv, "/api/jobs/api", "mx_bad_token")[0] == 401
