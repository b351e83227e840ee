"""`mixer replay`: bit-exact verification of recorded jobs, and counterfactuals stored as derived jobs."""

from __future__ import annotations

import numpy as np
import pytest

from mixer import replay as rp
from mixer.client import MixerClient
from mixer.store import Store
from mixer.strategies import REGISTRY
from tests.offline.recording import SPEC, record


def test_verify_agrees_then_finds_a_corrupted_version(server_factory, db_url, cli, tmp_path):
    srv = server_factory(db_url)
    spec = {**SPEC, "name": "ver"}
    record(srv.address, spec, steps=150)
    code, _, doc = cli("replay", "ver", "--verify", "--db", db_url, "--json")
    store = Store(db_url)
    rec = store.get_job("ver")
    versions = [v for v, _ in store.versions(rec.id)]
    assert code == 0 and doc["ok"], doc
    assert doc["versions_checked"] == len(versions) > 10
    assert doc["reports"] == 300

    # The same database takes a derived job, and its versions travel to another database intact.
    assert cli("replay", "ver", "--set", "alpha=0.5", "--as", "ver-a", "--db", db_url)[0] == 0
    assert (
        cli("export", "ver-a", "--what", "versions", "-o", tmp_path / "ver-a.parquet", "--db", db_url)[0] == 0
    )
    assert cli("import", tmp_path / "ver-a.parquet", "--db", tmp_path / "copy.db")[0] == 0
    copy = Store(str(tmp_path / "copy.db"))
    derived = [v for v, _ in store.versions(store.get_job("ver-a").id)]
    assert all(a.same_as(b) for a, b in zip(derived, (v for v, _ in copy.versions(copy.get_job("ver-a").id))))
    copy.close()

    target = versions[7]
    store.overwrite_version_weights(rec.id, 7, target.weights + np.array([1e-9, -1e-9, 0.0, 0.0]))
    code, out, _ = cli("replay", "ver", "--verify", "--db", db_url)
    assert code == 1
    assert f"DIVERGES at version 7, step {target.effective_step}" in out
    code, _, doc = cli("replay", "ver", "--verify", "--db", db_url, "--json")
    assert code == 1 and not doc["ok"]
    fd = doc["first_divergence"]
    assert fd["version"] == 7 and fd["step"] == target.effective_step
    assert 5e-10 < fd["max_abs_weight_diff"] < 2e-9
    assert doc["versions_checked"] == 8  # versions 0..7: the replay stops at the first divergence
    store.close()


def test_counterfactual_is_deterministic_and_served_as_a_derived_job(recorded, cli):
    srv, db = recorded
    store = Store(db)
    _, spec, log = rp.load_log(store, "rec")
    new = rp.derive_spec(
        spec, name="rec-dr", strategy="doremi", sets=[("eta", 0.5), ("cadence.update_every", 20)]
    )
    # The stored form writes every parameter out; only eta moved from DoReMi's defaults.
    assert (
        new.strategy.params == {**REGISTRY["doremi"].defaults, "eta": 0.5} and new.cadence.update_every == 20
    )
    assert new.cadence.min_weight == spec.cadence.min_weight
    a, b = rp.replay(new, log), rp.replay(new, log)
    assert len(a.versions) == len(b.versions) > 3
    assert all(x.same_as(y) for x, y in zip(a.versions, b.versions))

    args = (
        "replay",
        "rec",
        "--strategy",
        "doremi",
        "--set",
        "eta=0.5",
        "--set",
        "cadence.update_every=20",
        "--as",
        "rec-dr",
        "--db",
        db,
    )
    code, out, _ = cli(*args)
    assert code == 0, out
    assert "open loop" in out and "stored as job 'rec-dr'" in out
    code, _, doc = cli(*args, "--json")
    assert code == 0 and doc["stored"] == "already stored, identical" and doc["open_loop"]
    assert doc["versions"] == len(a.versions)

    derived = store.get_job("rec-dr")
    assert derived.source_job == "rec"
    stored = [v for v, _ in store.versions(derived.id)]
    assert all(x.same_as(y) for x, y in zip(stored, a.versions)) and len(stored) == len(a.versions)
    code, _, doc = cli("replay", "rec-dr", "--verify", "--db", db, "--json")
    assert code == 0 and doc["ok"] and doc["log_job"] == "rec"

    with MixerClient(srv.address) as c:
        job = c.get_job("rec-dr")
        assert job.source_job == "rec" and job.strategy == "doremi"
        assert job.latest_version == a.versions[-1].version
        served = c.list_versions("rec-dr")
        assert [v.version for v in served] == [v.version for v in a.versions]
        assert all(np.array_equal(s.weights, v.weights) for s, v in zip(served, a.versions))
        latest = c.get_weights("rec-dr")
        assert np.array_equal(latest.weights, a.versions[-1].weights)
        assert "rec-dr" in {j.name for j in c.list_jobs()}
    store.close()


def test_set_errors_name_the_key(recorded, cli):
    _, db = recorded
    code, out, _ = cli("replay", "rec", "--set", "alpha=2", "--db", db)
    assert code == 1 and "--set alpha" in out and "strategy.params.alpha" in out
    code, out, _ = cli("replay", "rec", "--set", "cadence.update_every=0", "--db", db)
    assert code == 1 and "--set cadence.update_every" in out
    code, out, _ = cli("replay", "rec", "--set", "cadence.bogus=1", "--db", db)
    assert code == 1 and "cadence.bogus" in out
    code, out, _ = cli("replay", "rec", "--set", "alpha", "--db", db)
    assert code == 1 and "expected key=value" in out
    code, out, _ = cli("replay", "rec", "--strategy", "nope", "--db", db)
    assert code == 1 and "unknown strategy 'nope'" in out
    code, out, _ = cli("replay", "missing", "--verify", "--db", db)
    assert code == 1 and "job 'missing' not found" in out
    code, out, _ = cli("replay", "rec", "--set", "alpha=0.4", "--as", "rec", "--db", db)
    assert code == 1 and "already exists" in out


def test_counterfactual_without_as_stores_nothing(recorded, cli):
    _, db = recorded
    store = Store(db)
    before = [j.name for j in store.list_jobs()]
    code, _, doc = cli("replay", "rec", "--set", "alpha=0.3", "--db", db, "--json")
    assert code == 0 and doc["stored"] is None and doc["sets"] == {"alpha": 0.3}
    assert [j.name for j in store.list_jobs()] == before
    store.close()


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--as", ""], "a job name is required"),
        (["--as", "  "], "a job name is required"),
        (["--rows", "0"], "'--rows': 0 is not in the range"),
    ],
)
def test_counterfactual_options_out_of_range_are_refused_by_name(recorded, cli, args, said):
    """An empty --as was taken as no --as at all: the counterfactual was silently not stored."""
    _, db = recorded
    store = Store(db)
    before = [j.name for j in store.list_jobs()]
    code, out, _ = cli("replay", "rec", "--set", "alpha=0.3", *args, "--db", db)
    assert code == 2 and said in out, out
    assert [j.name for j in store.list_jobs()] == before
    store.close()
