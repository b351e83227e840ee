"""Stored specs replay the same forever: a new job's stored spec carries every parameter, and a spec
stored before parameters were written out resolves to the defaults of its time."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import pytest

from mixer import replay as rp
from mixer.bench.replay import synthetic_log
from mixer.client import MixerClient
from mixer.spec import JobSpec, SpecError
from mixer.spec_defaults import DEFAULTS_VERSION, LEGACY_DEFAULTS, LEGACY_DEFAULTS_VERSION
from mixer.store import Store
from mixer.strategies import REGISTRY
from mixer.weighting import METHODS

DATA = json.loads((Path(__file__).parent / "data" / "doremi_legacy_versions.json").read_text())
"""Versions derived by the code before DoReMi had a `mode` (see the file's `source`)."""


@pytest.mark.parametrize("job", sorted(DATA["jobs"]))
def test_spec_stored_without_the_stamp_replays_bit_exact_under_the_old_defaults(job):
    rec = DATA["jobs"][job]
    spec = JobSpec.from_json(rec["spec_json"])
    assert spec.defaults_version == LEGACY_DEFAULTS_VERSION
    assert spec.strategy.params["mode"] == LEGACY_DEFAULTS["strategy"]["doremi"]["mode"]
    # The stored form and fingerprint stay as they were: snapshots and sampler checkpoints name them.
    assert spec.to_json() == rec["spec_json"] and spec.fingerprint() == rec["fingerprint"]
    log = synthetic_log(rec["log"]["K"], rec["log"]["steps"], seed=rec["log"]["seed"])
    derived = rp.replay(spec, log).versions
    want = rec["versions"]
    assert len(derived) == len(want)
    for v, w in zip(derived, want):
        assert (v.version, v.effective_step) == (w["version"], w["effective_step"])
        assert [float(x).hex() for x in v.weights] == w["weights"], v.version
        assert v.params == w["params"], v.version

    # Today's defaults on the same stored text would not reproduce it (or refuse it): what the stamp prevents.
    if "output" in json.loads(rec["spec_json"])["strategy"]["params"]:
        with pytest.raises(SpecError, match="applies to mode online only"):
            JobSpec.from_dict(json.loads(rec["spec_json"]))
        return
    today = JobSpec.from_dict(json.loads(rec["spec_json"]))
    assert today.strategy.params["mode"] != spec.strategy.params["mode"]
    moved = rp.replay(today, log).versions
    assert any(not np.array_equal(a.weights, b.weights) for a, b in zip(moved, derived))


def test_a_legacy_spec_keeps_its_defaults_through_a_counterfactual():
    rec = DATA["jobs"]["legacy-online"]
    spec = JobSpec.from_json(rec["spec_json"])
    derived = rp.derive_spec(spec, name="legacy-cf", sets=[("eta", 0.25)])
    assert derived.defaults_version == LEGACY_DEFAULTS_VERSION
    assert derived.strategy.params["mode"] == "online" and derived.strategy.params["eta"] == 0.25
    again = JobSpec.from_json(derived.to_json())
    assert again.resolved_json() == derived.resolved_json() and again.fingerprint() == derived.fingerprint()


def _every_param(spec: dict) -> None:
    assert spec["defaults_version"] == DEFAULTS_VERSION
    strategy, weighting = spec["strategy"], spec["weighting"]
    assert set(strategy["params"]) == set(REGISTRY[strategy["name"]].defaults)
    assert set(weighting["params"]) == set(METHODS[weighting["name"]])


def test_new_jobs_store_every_param_and_create_again_is_the_same_job(server_factory, db_url):
    srv = server_factory(db_url)
    user = {
        "name": "stamped",
        "domains": ["a", "b", "c"],
        "strategy": "doremi",
        "weighting": {"name": "dwm", "params": {"hidden": 8}},
    }
    with MixerClient(srv.address) as c:
        job, created = c.create_job(user)
        assert created
        stored = json.loads(job.spec_json)
        _every_param(stored)
        assert stored["strategy"]["params"]["mode"] == "paper"
        assert (
            stored["weighting"]["params"]["model"] == "batch-context"
            and stored["weighting"]["params"]["hidden"] == 8
        )
        again, created = c.create_job(user)
        assert not created and again.spec_json == job.spec_json
        # The stamped form given back is the same job too.
        assert c.create_job(stored)[1] is False
        with pytest.raises(grpc.RpcError) as e:
            c.create_job({**user, "strategy": {"name": "doremi", "params": {"mode": "online"}}})
        assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    store = Store(db_url)
    try:
        rec = store.get_job("stamped")
        _every_param(json.loads(rec.spec_json))
        assert JobSpec.from_json(rec.spec_json).fingerprint() == rec.fingerprint
    finally:
        store.close()


def test_create_again_of_a_job_stored_before_the_stamp(server_factory, db_url):
    """The same user spec is the same job when its resolved form is; DoReMi's moved default makes it another."""
    legacy = {
        name: {
            "name": name,
            "domains": [{"name": d, "prefix": "", "weight": 1.0, "size": 0.0} for d in "ab"],
            "strategy": {"name": strategy, "params": {}},
            "weighting": {"name": weighting, "params": {}},
            "cadence": JobSpec.from_dict({"name": "x", "domains": ["a"]}).to_dict()["cadence"],
            "unit": "samples",
            "seed": 0,
        }
        for name, strategy, weighting in (
            ("old-odm", "odm", "none"),
            ("old-doremi", "doremi", "none"),
            ("old-dwm", "odm", "dwm"),
        )
    }
    store = Store(db_url)
    for d in legacy.values():
        text = json.dumps(d, sort_keys=True, separators=(",", ":"))
        spec = JobSpec.from_json(text)
        assert spec.defaults_version == LEGACY_DEFAULTS_VERSION and spec.to_json() == text
        store.create_job(d["name"], text, spec.fingerprint(), d["strategy"]["name"])
    store.close()
    assert JobSpec.from_json(json.dumps(legacy["old-dwm"])).weighting.params["model"] == "mlp-features"
    srv = server_factory(db_url)
    user = {
        n: {
            "name": n,
            "domains": ["a", "b"],
            "strategy": d["strategy"]["name"],
            "weighting": d["weighting"]["name"],
        }
        for n, d in legacy.items()
    }
    with MixerClient(srv.address) as c:
        job, created = c.create_job(user["old-odm"])
        assert not created and json.loads(job.spec_json) == legacy["old-odm"]
        for name in ("old-doremi", "old-dwm"):
            with pytest.raises(grpc.RpcError) as e:
                c.create_job(user[name])
            assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS, name
        # Spelled with the old defaults, it is the same job.
        assert (
            c.create_job(
                {**user["old-doremi"], "strategy": {"name": "doremi", "params": {"mode": "online"}}}
            )[1]
            is False
        )
        assert (
            c.create_job(
                {**user["old-dwm"], "weighting": {"name": "dwm", "params": {"model": "mlp-features"}}}
            )[1]
            is False
        )


@pytest.mark.parametrize("bad", [0, 3, True, "2"])
def test_defaults_version_has_a_range(bad):
    with pytest.raises(SpecError) as e:
        JobSpec.from_dict({"name": "v", "domains": ["a"], "defaults_version": bad})
    assert e.value.field == "defaults_version"


def test_a_legacy_weighting_is_served_as_it_was_stored() -> None:
    """Versions carry the weighting parameters as stored: a spec stored before parameters were
    written out served only those it was given, so its replay must serve the same."""
    from mixer.engine import Engine

    stored = {
        "name": "legacy-loss",
        "domains": [{"name": "a"}, {"name": "b"}],
        "strategy": {"name": "odm", "params": {}},
        "weighting": {"name": "loss", "params": {"method": "linupper"}},
        "cadence": {"update_every": 5},
        "seed": 0,
    }
    legacy = JobSpec.from_json(json.dumps(stored))
    assert Engine(legacy).current.params["weighting"] == stored["weighting"]["params"]
    assert set(legacy.weighting.params) > set(stored["weighting"]["params"])  # resolved in memory
    fresh = JobSpec.from_dict(stored)  # a new job's stored spec carries, and serves, every parameter
    assert Engine(fresh).current.params["weighting"] == fresh.weighting.params
