"""A real Prometheus scrapes a real `mixer serve` while a job streams: every dashboard query has data."""

from __future__ import annotations

import json
import math
import re
import subprocess
import threading
import time
import urllib.parse
import urllib.request

import grpc
import numpy as np
import pytest
import yaml

from mixer.bench.launch import free_port
from mixer.client import MixerClient
from mixer.signals import Report
from tests.monitoring.conftest import REPO, binary

DASHBOARD = REPO / "deploy/grafana/dashboards/mixer.json"
PROMETHEUS_YML = REPO / "deploy/prometheus/prometheus.yml"


def get_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


@pytest.fixture
def prometheus(tmp_path):
    """Start /usr/bin/prometheus on a free loopback port with deploy/prometheus/prometheus.yml, retargeted."""
    exe = binary("/usr/bin/prometheus", "prometheus")
    procs: list[subprocess.Popen] = []

    def start(metrics_port: int) -> str:
        cfg = yaml.safe_load(PROMETHEUS_YML.read_text())
        cfg["global"].update(scrape_interval="1s", evaluation_interval="1s", scrape_timeout="1s")
        (scrape,) = cfg["scrape_configs"]
        scrape["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
        path = tmp_path / "prometheus.yml"
        path.write_text(yaml.safe_dump(cfg))
        port = free_port()
        with open(tmp_path / "prometheus.log", "wb") as log:
            procs.append(subprocess.Popen(
                [exe, f"--config.file={path}", f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
            ))
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            if procs[-1].poll() is not None:
                raise AssertionError(f"prometheus exited with {procs[-1].returncode}:\n{(tmp_path / 'prometheus.log').read_text()}")
            try:
                if urllib.request.urlopen(base + "/-/ready", timeout=1).status == 200:
                    return base
            except OSError:
                pass
            assert time.monotonic() < deadline, "prometheus not ready after 30s"
            time.sleep(0.2)

    yield start
    for p in procs:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every query in the dashboard, rows and repeats included."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for p in [panel, *panel.get("panels", [])]:
            out.extend((p["title"], t["expr"]) for t in p.get("targets", []))
    return out


def substitute(expr: str, job: str) -> str:
    values = {"job": job, "__rate_interval": "10s", "__interval": "2s", "__range": "1m"}
    out = re.sub(r"\$\{?(\w+)\}?", lambda m: values[m.group(1)], expr)
    assert "$" not in out, f"unknown template variable left in {out!r}"
    return out


def query(base: str, expr: str) -> list[dict]:
    body = get_json(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_every_dashboard_query_returns_data(stream, prometheus):
    stream.wait_steps(20)
    # Unary calls (a tool polling the weights) for the RPC panels, and one refused report for the rejections panel.
    stop = threading.Event()

    def poll_weights():
        with MixerClient(stream.server.address) as c:
            while not stop.wait(0.2):
                c.get_weights(stream.job)

    poller = threading.Thread(target=poll_weights, daemon=True)
    poller.start()
    with MixerClient(stream.server.address) as c, pytest.raises(grpc.RpcError, match="domain_loss_sum"):
        c.report(stream.job, Report(step=stream.step, source="bad", domain_loss_sum=np.array([1.0])))
    try:
        base = prometheus(stream.server.http_port)
        queries = dashboard_queries()
        assert len(queries) >= 15
        deadline = time.monotonic() + 45
        missing = dict.fromkeys(substitute(e, stream.job) for _, e in queries)
        while missing and time.monotonic() < deadline:
            for expr in list(missing):
                result = query(base, expr)
                # Non-empty, and at least one real number: a histogram with no traffic would give only NaN.
                if result and any(math.isfinite(float(r["value"][1])) for r in result):
                    del missing[expr]
            time.sleep(0.5)
        assert not missing, f"dashboard queries without data after 45s: {list(missing)}"

        # The dashboard's job variable (label_values(mixer_domain_weight, job)) lists the streaming job,
        # under its own name: the scrape config keeps mixer's `job` label (honor_labels).
        jobs = get_json(f"{base}/api/v1/label/job/values?" + urllib.parse.urlencode({"match[]": "mixer_domain_weight"}))["data"]
        assert jobs == [stream.job]
        domains = {r["metric"]["domain"] for r in query(base, f'mixer_domain_weight{{job="{stream.job}"}}')}
        assert domains == set(stream.domains)
    finally:
        stop.set()
        poller.join(5)
