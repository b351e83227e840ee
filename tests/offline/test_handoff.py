"""Proxy-to-main hand-off: a main job's prior is the proxy's time-averaged served weights."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest

from mixer.client import MixerClient
from mixer.handoff import (
    Averaging,
    HandoffError,
    apply_to_spec,
    proxy_from_file,
    proxy_from_server,
    time_average,
)
from mixer.replay import verify
from mixer.spec import JobSpec
from mixer.store import Store
from tests.offline.recording import SPEC


def _brute_force(eff: list[int], weights: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Walk every trained step, take the version in force there, and average in float64."""
    total = np.zeros(weights.shape[1])
    for step in range(start, stop):
        v = max(i for i, e in enumerate(eff) if e <= step)
        total += weights[v]
    return total / total.sum()


@pytest.mark.parametrize("seed", range(5))
def test_time_average_equals_a_walk_over_the_steps(seed):
    rng = np.random.default_rng(seed)
    V, K, end = int(rng.integers(1, 12)), int(rng.integers(2, 9)), int(rng.integers(5, 400))
    eff = sorted([0, *rng.integers(0, end + 50, size=V - 1).tolist()])  # some take effect after the end
    w = rng.dirichlet(np.ones(K), size=V)
    rules = [
        Averaging(),
        Averaging("last", int(rng.integers(1, end + 1))),
        Averaging("from-step", int(rng.integers(0, end))),
    ]
    for rule in rules:
        start, stop = rule.window(end)
        got = time_average(np.array(eff), w, end, rule)
        np.testing.assert_allclose(got, _brute_force(eff, w, start, stop), rtol=1e-12, atol=1e-15)


def test_averaging_rules_parse_and_refuse_clearly():
    assert Averaging.parse("all") == Averaging()
    assert Averaging.parse("last:50") == Averaging("last", 50)
    assert str(Averaging.parse("from-step:7")) == "from-step:7"
    for bad in ("last", "last:0", "from:3", "last:-1", "everything"):
        with pytest.raises(HandoffError, match="--average"):
            Averaging.parse(bad)
    with pytest.raises(HandoffError, match="holds no trained step"):
        time_average(np.array([0]), np.ones((1, 2)) / 2, 10, Averaging("from-step", 10))


def _main_spec(name: str, domains: list[str], strategy: str = "odm") -> dict:
    return {"name": name, "domains": [{"name": d} for d in domains], "strategy": {"name": strategy}}


def test_main_job_starts_from_the_proxy_average_and_keeps_its_lineage(recorded, cli, tmp_path):
    srv, db = recorded
    with MixerClient(srv.address) as c:
        proxy = proxy_from_server(c, SPEC["name"])
        versions = c.list_versions(SPEC["name"])
        job = c.get_job(SPEC["name"])
        domains = list(job.domains)
        # The expectation, in float64 from ListVersions: each version weighs the steps it was in force.
        eff = [v.effective_step for v in versions]
        w = np.array([v.weights for v in versions])
        expected = _brute_force(eff, w, 0, job.max_step + 1)
        reversed_domains = domains[::-1]  # order may differ; names must match
        spec = apply_to_spec(_main_spec("main-from-proxy", reversed_domains), proxy, Averaging())
        created, _ = c.create_job(spec)
        stored = JobSpec.from_json(created.spec_json)
        prior = dict(zip(stored.domain_names, stored.prior()))
        np.testing.assert_allclose([prior[d] for d in domains], expected, rtol=1e-12)
        assert stored.lineage == {
            "source_job": SPEC["name"],
            "source": "server",
            "average": "all",
            "final_version": versions[-1].version,
            "max_step": job.max_step,
        }
        # A static main job serves exactly the average.
        static = apply_to_spec(_main_spec("main-static", domains, "static"), proxy, Averaging("last", 40))
        c.create_job(static)
        v0 = c.get_weights("main-static")
        np.testing.assert_allclose(
            v0.weights, _brute_force(eff, w, job.max_step + 1 - 40, job.max_step + 1), rtol=1e-12
        )

    # /api/jobs/NAME (what the page draws) shows it.
    with urllib.request.urlopen(
        f"http://127.0.0.1:{srv.http_port}/api/jobs/main-from-proxy", timeout=10
    ) as r:
        assert json.load(r)["lineage"]["final_version"] == versions[-1].version
    # The lineage is in the stored spec (what a restart loads), and replay re-derives the versions exactly.
    store = Store(db)
    try:
        assert json.loads(store.get_job("main-from-proxy").spec_json)["lineage"]["source_job"] == SPEC["name"]
        assert verify(store, "main-static").ok
    finally:
        store.close()


def test_the_same_from_an_exported_file(recorded, cli, tmp_path):
    srv, db = recorded
    out = tmp_path / "proxy.parquet"
    code, output, _ = cli(
        "export", SPEC["name"], "--what", "versions", "--format", "parquet", "-o", out, "--db", db
    )
    assert code == 0, output
    from_file = proxy_from_file(out)
    with MixerClient(srv.address) as c:
        from_server = proxy_from_server(c, SPEC["name"])
    assert from_file.domains == from_server.domains and from_file.max_step == from_server.max_step
    np.testing.assert_array_equal(from_file.average(Averaging()), from_server.average(Averaging()))
    spec = apply_to_spec(_main_spec("main-from-file", from_file.domains), from_file, Averaging())
    assert spec["lineage"]["source"] == str(out)


def test_clear_errors(recorded, tmp_path):
    srv, _ = recorded
    with MixerClient(srv.address) as c:
        with pytest.raises(HandoffError, match="unknown proxy job 'no-such-proxy'"):
            proxy_from_server(c, "no-such-proxy")
        proxy = proxy_from_server(c, SPEC["name"])
        domains = list(proxy.domains)
        bad = _main_spec("main-bad", [*domains[1:], "wiki"])
        with pytest.raises(
            HandoffError, match=f"missing from the proxy: wiki; only in the proxy: {domains[0]}"
        ):
            apply_to_spec(bad, proxy, Averaging())
        c.create_job(_main_spec("never-trained", domains))
        with pytest.raises(HandoffError, match="has no reports yet"):
            apply_to_spec(_main_spec("main-x", domains), proxy_from_server(c, "never-trained"), Averaging())
    with pytest.raises(HandoffError, match="no such file"):
        proxy_from_file(tmp_path / "missing.parquet")


def test_job_create_init_from_on_the_command_line(recorded, tmp_path):
    from click.testing import CliRunner

    from mixer.cli import main

    srv, _ = recorded
    with MixerClient(srv.address) as c:
        proxy = proxy_from_server(c, SPEC["name"])
    spec_file = tmp_path / "main.yaml"
    spec_file.write_text(json.dumps(_main_spec("main-cli", proxy.domains)))  # JSON is YAML
    run = CliRunner().invoke(
        main,
        [
            "job",
            "create",
            str(spec_file),
            "--init-from",
            SPEC["name"],
            "--average",
            "last:30",
            "--address",
            srv.address,
            "--json",
        ],
        catch_exceptions=False,
    )
    assert run.exit_code == 0, run.output
    doc = json.loads(run.output.strip().splitlines()[-1])
    assert doc["lineage"]["average"] == "last:30" and doc["lineage"]["source_job"] == SPEC["name"]
    with MixerClient(srv.address) as c:
        prior = JobSpec.from_json(c.get_job("main-cli").spec_json).prior()
    np.testing.assert_allclose(prior, proxy.average(Averaging("last", 30)), rtol=1e-12)
    bad = CliRunner().invoke(
        main, ["job", "create", str(spec_file), "--init-from", "nope", "--address", srv.address]
    )
    assert bad.exit_code != 0 and "unknown proxy job 'nope'" in bad.output
