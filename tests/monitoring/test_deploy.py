"""deploy/: compose, Kubernetes, Prometheus and Grafana files parse, point at files that exist,
and agree with the service's defaults (gRPC 50051, HTTP 9400, /metrics)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml
from click.testing import CliRunner

from mixer.cli import main as cli
from mixer.server.app import ServeConfig
from mixer.spec import JobSpec
from tests.monitoring.conftest import REPO, binary

DEPLOY = REPO / "deploy"
GRPC_PORT, HTTP_PORT, METRICS_PATH = 50051, 9400, "/metrics"
DASHBOARD = DEPLOY / "grafana/dashboards/mixer.json"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def flag(args: list[str], name: str) -> str:
    assert name in args, f"{name} missing from {args}"
    return args[args.index(name) + 1]


def test_service_defaults_are_the_ones_deploy_assumes():
    cfg = ServeConfig()
    assert (cfg.port, cfg.http_port) == (GRPC_PORT, HTTP_PORT)
    help_text = CliRunner().invoke(cli, ["serve", "--help"]).output
    assert re.search(rf"--port INTEGER.*?\[default: {GRPC_PORT}\]", help_text, re.DOTALL), help_text
    assert re.search(rf"--http-port INTEGER.*\[default:\s+{HTTP_PORT}\]", help_text, re.DOTALL), help_text


def test_prometheus_config_is_valid_and_scrapes_mixer():
    promtool = binary("/usr/bin/promtool", "prometheus")
    out = subprocess.run([promtool, "check", "config", str(DEPLOY / "prometheus/prometheus.yml")], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    (scrape,) = load(DEPLOY / "prometheus/prometheus.yml")["scrape_configs"]
    assert scrape["metrics_path"] == METRICS_PATH and scrape["honor_labels"] is True
    assert scrape["static_configs"][0]["targets"] == [f"mixer:{HTTP_PORT}"]


def test_grafana_provisioning_and_dashboard_agree():
    (ds,) = load(DEPLOY / "grafana/provisioning/datasources/prometheus.yaml")["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    text = DASHBOARD.read_text()
    assert "${DS_" not in text and "__inputs" not in text, "the dashboard must refer to its datasource by the fixed uid"
    dash = json.loads(text)
    uids = {json.dumps(o) for o in _find(dash, "datasource") if isinstance(o, dict) and o.get("type") == "prometheus"}
    assert uids == {json.dumps({"type": "prometheus", "uid": ds["uid"]})}
    (var,) = dash["templating"]["list"]
    assert var["name"] == "job" and var["query"]["query"] == "label_values(mixer_domain_weight, job)"
    exprs = [e for e in _find(dash, "expr")]
    for metric in ("mixer_domain_weight", "mixer_domain_loss", "mixer_versions_total", "mixer_reports_total", "mixer_samples_total",
                   "mixer_ingest_lag_seconds_bucket", "mixer_rpc_duration_seconds_bucket", "mixer_db_commit_duration_seconds_bucket",
                   "mixer_applied_version_lag_steps"):
        assert any(metric in e for e in exprs), f"no panel queries {metric}"
    weights = next(p for p in dash["panels"] if p["title"].startswith("Domain weights"))
    assert weights["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal" and weights["repeat"] == "job"
    (provider,) = load(DEPLOY / "grafana/provisioning/dashboards/mixer.yaml")["providers"]
    compose = load(DEPLOY / "compose/docker-compose.yaml")
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"] if v.startswith("."))
    assert mounts["../grafana/dashboards"] == provider["options"]["path"]
    assert mounts["../grafana/provisioning"] == "/etc/grafana/provisioning"


def _find(obj, key: str):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == key:
                yield v
            yield from _find(v, key)
    elif isinstance(obj, list):
        for v in obj:
            yield from _find(v, key)


def test_compose_references_existing_files_and_the_default_ports():
    here = DEPLOY / "compose"
    compose = load(here / "docker-compose.yaml")
    services = compose["services"]
    assert {"mixer", "postgres", "prometheus", "grafana"} <= set(services)
    for name, svc in services.items():
        build = svc.get("build")
        if build:
            context = (here / build["context"]).resolve()
            assert (context / build["dockerfile"]).is_file(), f"{name}: no Dockerfile at {build}"
            assert (context / "pyproject.toml").is_file(), f"{name}: build context {context} is not the repository root"
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (here / src).exists(), f"{name}: mounts {src}, which does not exist"
            else:
                assert src in compose["volumes"], f"{name}: named volume {src} is not declared"
    args = services["mixer"]["command"]
    assert args[0] == "serve" and flag(args, "--port") == str(GRPC_PORT) and flag(args, "--http-port") == str(HTTP_PORT)
    assert flag(args, "--db").startswith("postgresql://") and "@postgres:5432/" in flag(args, "--db")
    assert {p.rsplit(":", 1)[1] for p in services["mixer"]["ports"]} == {str(GRPC_PORT), str(HTTP_PORT)}
    assert f"mixer:{GRPC_PORT}" in " ".join(services["mixer-jobs"]["entrypoint"])
    dockerfile = (here / "Dockerfile").read_text()
    assert re.search(rf"^EXPOSE {GRPC_PORT} {HTTP_PORT}$", dockerfile, re.MULTILINE)
    for src in re.findall(r"^COPY (.+) \S+$", dockerfile, re.MULTILINE):
        for part in src.split():
            assert (REPO / part).exists(), f"Dockerfile copies {part}, which does not exist"


def test_kubernetes_manifests_agree_and_generate_configmaps_from_the_same_files():
    docs = {}
    k8s = load(DEPLOY / "k8s/kustomization.yaml")
    for res in k8s["resources"]:
        for doc in yaml.safe_load_all((DEPLOY / "k8s" / res).read_text()):
            docs[doc["kind"]] = doc
    assert {"Deployment", "Service", "ServiceMonitor", "Job"} <= set(docs)
    pod = docs["Deployment"]["spec"]["template"]
    assert docs["Deployment"]["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (c,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": GRPC_PORT, "http": HTTP_PORT}
    assert flag(c["args"], "--port") == str(GRPC_PORT) and flag(c["args"], "--http-port") == str(HTTP_PORT)
    assert c["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    svc = docs["Service"]
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert {p["name"]: (p["port"], p["targetPort"]) for p in svc["spec"]["ports"]} == {"grpc": (GRPC_PORT, "grpc"), "http": (HTTP_PORT, "http")}
    mon = docs["ServiceMonitor"]
    assert mon["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (ep,) = mon["spec"]["endpoints"]
    assert (ep["port"], ep["path"], ep["honorLabels"]) == ("http", METRICS_PATH, True)
    job = docs["Job"]["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in job["containers"][0]["env"]}
    assert env["MIXER_ADDRESS"] == f"{svc['metadata']['name']}:{GRPC_PORT}"

    top = load(DEPLOY / "kustomization.yaml")
    assert top["resources"] == ["k8s"]
    gens = {g["name"]: g for g in top["configMapGenerator"]}
    for g in gens.values():
        for f in g["files"]:
            path = (DEPLOY / f).resolve()
            assert path.is_file() and DEPLOY in path.parents, f"{g['name']}: {f} must be a file under deploy/ (kustomize's root)"
    # One source of truth: the dashboard ConfigMap is generated from the file Grafana mounts in compose.
    assert [(DEPLOY / f).resolve() for f in gens["mixer-grafana-dashboard"]["files"]] == [DASHBOARD.resolve()]
    assert gens["mixer-grafana-dashboard"]["options"]["labels"] == {"grafana_dashboard": "1"}
    (vol,) = job["volumes"]
    assert vol["configMap"]["name"] == "mixer-jobs" and "mixer-jobs" in gens
    for f in gens["mixer-jobs"]["files"]:
        JobSpec.from_yaml((DEPLOY / f).read_text())  # raises naming the field if a spec is invalid
    assert "../jobs:/jobs:ro" in load(DEPLOY / "compose/docker-compose.yaml")["services"]["mixer-jobs"]["volumes"]
