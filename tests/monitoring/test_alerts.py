"""deploy/prometheus/alerts.yml: valid, unit-tested with promtool on synthetic series, built only
from series the server exports, provisioned in compose and Kubernetes, listed in deploy/README.md;
and end to end, a real Prometheus fires rules against a real server made to trip them.
Also: mixer_rejected_reports_total exists at 0 for every reason before the first rejection."""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.parse
from pathlib import PurePosixPath
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
import yaml
from prometheus_client import generate_latest

from mixer.client import MixerClient
from mixer.engine import Engine
from mixer.replay import verify
from mixer.server.metrics import REJECT_REASONS, Metrics
from mixer.signals import Report
from mixer.spec import JobSpec
from mixer.store import Store
from tests.monitoring.conftest import REPO, binary
from tests.monitoring.test_prometheus import get_json, prometheus  # noqa: F401  (a fixture)

DEPLOY = REPO / "deploy"
ALERTS = DEPLOY / "prometheus/alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus/alerts_test.yml"


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def promtool(*args: str) -> subprocess.CompletedProcess:
    exe = binary("/usr/bin/promtool", "prometheus")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120, check=False)


def test_rules_are_valid_and_pass_their_unit_tests():
    out = promtool("check", "rules", str(ALERTS))
    assert out.returncode == 0, out.stdout + out.stderr
    out = promtool("test", "rules", str(ALERTS_TEST))
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_is_unit_tested_firing_and_listed_in_the_readme():
    names = [r["alert"] for r in rules()]
    assert len(names) == len(set(names)) and {
        "MixerServerNotReady", "MixerNoNewVersion", "MixerAppliedVersionLagHigh", "MixerDomainStarving",
        "MixerRejectedReportsRising", "MixerIngestLagHigh",
    } <= set(names)
    fired = {
        a["exp_labels"].get("alertname", case["alertname"])
        for t in yaml.safe_load(ALERTS_TEST.read_text())["tests"]
        for case in t["alert_rule_test"]
        for a in case.get("exp_alerts", [])
    }
    assert fired == set(names), f"alerts never shown firing in alerts_test.yml: {set(names) - fired}"
    readme = (DEPLOY / "README.md").read_text()
    for r in rules():
        assert f"`{r['alert']}`" in readme, f"{r['alert']} is not listed in deploy/README.md"
        assert {"summary", "description"} <= set(r["annotations"]) and r["labels"]["severity"] in ("warning", "critical")


def exported_names() -> set[str]:
    """Every sample name the server's registry exposes, with a live job whose spec turns every
    per-job series on (starvation detection included) and every histogram observed."""
    spec = JobSpec.from_dict({"name": "j", "domains": ["a", "b"], "strategy": "odm", "cadence": {"starvation_versions": 2}})
    eng = Engine(spec)
    rt = SimpleNamespace(job=SimpleNamespace(name="j", status="active"), spec=spec, engine=eng, last_loss=np.ones(2),
                         applied_lag=0, report_count=1, sample_count=1, duplicate_count=0)
    m = Metrics(lambda: [rt])
    m.rpc_seconds.labels("Report").observe(0.001)
    m.observe_update("odm", 0.001)
    m.observe_commit(0.001, 1)
    m.ingest_seconds.observe(0.001)
    m.push_seconds.observe(0.001)
    return {s.name for fam in m.registry.collect() for s in fam.samples}


def test_rules_use_only_series_the_server_exports():
    exported = exported_names()
    for r in rules():
        used = set(re.findall(r"\b(mixer_[a-z_]+|up)\b(?!\s*\()", r["expr"]))
        assert used, r["alert"]
        missing = {n for n in used if n != "up" and n not in exported}
        assert not missing, f"{r['alert']} uses {missing}, which the server does not export"


def test_rules_are_provisioned_in_compose_and_kubernetes():
    prom = DEPLOY / "prometheus/prometheus.yml"
    files = yaml.safe_load(prom.read_text())["rule_files"]
    assert [(prom.parent / f).resolve() for f in files] == [ALERTS.resolve()]
    out = promtool("check", "config", str(prom))
    assert out.returncode == 0 and "7 rules found" in out.stdout + out.stderr, out.stdout + out.stderr
    # compose mounts the rules next to the config, where its relative rule_files points
    compose = yaml.safe_load((DEPLOY / "compose/docker-compose.yaml").read_text())
    mounts = dict(v.split(":")[:2] for v in compose["services"]["prometheus"]["volumes"] if v.startswith("."))
    conf_dir = PurePosixPath(mounts["../prometheus/prometheus.yml"]).parent
    assert [PurePosixPath(mounts["../prometheus/alerts.yml"])] == [conf_dir / f for f in files]
    # Kubernetes (Prometheus Operator): a PrometheusRule with the very same groups
    k8s = yaml.safe_load((DEPLOY / "k8s/kustomization.yaml").read_text())
    assert "prometheusrule.yaml" in k8s["resources"]
    rule = yaml.safe_load((DEPLOY / "k8s/prometheusrule.yaml").read_text())
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"], (
        "deploy/k8s/prometheusrule.yaml differs from deploy/prometheus/alerts.yml: copy the groups over"
    )


def test_rejected_reports_exist_at_zero_for_every_reason():
    """A dashboard panel or a rate() over mixer_rejected_reports_total has data on a healthy
    server (it showed "No data" until the first rejection), and every reason the server counts
    is one of REJECT_REASONS."""
    text = generate_latest(Metrics(list).registry).decode()
    for reason in REJECT_REASONS:
        assert f'mixer_rejected_reports_total{{reason="{reason}"}} 0.0' in text
    counted = set()
    for path in (REPO / "mixer/server").glob("*.py"):
        counted |= set(re.findall(r"""\breject(?:ed)?\(\s*["'](\w+)["']""", path.read_text()))
    assert counted and counted <= set(REJECT_REASONS), f"reasons counted but not initialised: {counted - set(REJECT_REASONS)}"


# -- end to end ------------------------------------------------------------------------------------

STARVING_JOB = "starving-run"
STARVING_SPEC = {
    "name": STARVING_JOB,
    "domains": ["web", "code", "noise"],
    "strategy": {"name": "static", "params": {"mode": "schedule", "schedule": [
        {"step": 0, "weights": [1, 1, 1]}, {"step": 3, "weights": [1, 1, 0]}, {"step": 8, "weights": [2, 1, 0]}]}},
    "cadence": {"update_every": 1, "min_weight": 0.05, "max_step_l1": 0.2, "starvation_versions": 2},
}
TRIPPED = ("MixerRejectedReportsRising", "MixerDomainStarving", "MixerServerNotReady")


def firing(base: str) -> list[dict]:
    return [a for a in get_json(f"{base}/api/v1/alerts")["data"]["alerts"] if a["state"] == "firing"]


def wait_for(base: str, pred, what: str, timeout: float = 40.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        alerts = firing(base)
        if pred(alerts):
            return alerts
        assert time.monotonic() < deadline, f"{what} not firing after {timeout}s; firing: {json.dumps(alerts)}"
        time.sleep(0.5)


def test_prometheus_fires_alerts_against_a_real_server(server_factory, sqlite_url, prometheus, tmp_path):  # noqa: F811
    """A real server is made to refuse reports (invalid), to starve a domain (a schedule that drops
    it, with the bound walking it to the floor), and then to stop; a real Prometheus loading
    deploy/prometheus/alerts.yml (each rule's `for` cut to 0 s; promtool tests the waits) fires
    each alert with the right labels, and only those."""
    cfg = yaml.safe_load(ALERTS.read_text())
    for g in cfg["groups"]:
        for r in g["rules"]:
            r["for"] = "0s"
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(cfg))  # next to the config the fixture writes

    srv = server_factory(sqlite_url)
    with MixerClient(srv.address) as c:
        c.create_job(STARVING_SPEC)
    base = prometheus(srv.http_port)
    q = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": 'up{job="mixer"}'})
    deadline = time.monotonic() + 20
    while not get_json(q)["data"]["result"] or get_json(q)["data"]["result"][0]["value"][1] != "1":
        assert time.monotonic() < deadline, "prometheus never scraped the server"
        time.sleep(0.3)
    time.sleep(1.5)  # one more scrape: the rejection counters' zeros are in the TSDB before they move
    assert not [a for a in firing(base) if a["labels"]["alertname"] in TRIPPED]

    with MixerClient(srv.address) as c:
        for step in range(12):
            c.report(STARVING_JOB, Report(step=step, source="rank0"))
        for step in range(15):
            with pytest.raises(grpc.RpcError, match="domain_loss_sum"):
                c.report(STARVING_JOB, Report(step=12 + step, source="bad", domain_loss_sum=np.array([1.0])))
        params = c.get_weights(STARVING_JOB).params
    assert params["starving"] == [2]

    def tripped(alerts, name, **labels):
        return [a for a in alerts if a["labels"]["alertname"] == name and labels.items() <= a["labels"].items()]

    alerts = wait_for(base, lambda al: tripped(al, "MixerRejectedReportsRising", reason="invalid")
                      and tripped(al, "MixerDomainStarving", job=STARVING_JOB, domain="noise"), "rejections and starvation")
    assert not tripped(alerts, "MixerDomainStarving", domain="web") and not tripped(alerts, "MixerServerNotReady")
    assert not tripped(alerts, "MixerRejectedReportsRising", reason="stale")
    (starving,) = tripped(alerts, "MixerDomainStarving")
    assert starving["annotations"]["summary"] == f"domain noise of job {STARVING_JOB} is starving"

    srv.kill()
    wait_for(base, lambda al: tripped(al, "MixerServerNotReady", job="mixer"), "MixerServerNotReady after the server stopped")

    # What the server stored is what a replay derives, starvation entries included.
    store = Store(sqlite_url)
    try:
        result = verify(store, STARVING_JOB)
        assert result.ok, result.to_dict()
        rec = store.get_job(STARVING_JOB)
        # the bound walks noise down over three versions (at the floor in the third), the next
        # change of the schedule is its second version there: starving from then on
        assert [v.params["starving"] for v, _ in store.versions(rec.id)] == [[], [], [], [], [2], [2]]
    finally:
        store.close()
