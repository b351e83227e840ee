"""`mixer sweep`: trials as counterfactual replays on a real local Ray, ranked and resumable."""

from __future__ import annotations

import pytest
import yaml

from mixer.spec import JobSpec
from mixer.sweep import SweepConfig, SweepError, trials

SWEEP = {
    "job": "rec",
    "objective": {"kind": "weighted_loss", "direction": "min"},
    "space": [
        {"strategy": "odm", "params": {"alpha": [0.5, 0.9]}},
        {"strategy": "doremi", "params": {"eta": [0.5, 2.0]}, "cadence": {"update_every": 20}},
    ],
}


@pytest.mark.ray
def test_sweep_runs_four_trials_on_ray_ranks_them_and_resumes(recorded, cli, tmp_path):
    _, db = recorded
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(SWEEP))
    code, out, doc = cli("sweep", path, "--num-cpus", "2", "--db", db, "--json")
    assert code == 0, out
    assert doc["ran"] == 4 and doc["skipped"] == 0 and not doc["failed"]
    scores = [t["score"] for t in doc["trials"]]
    assert [t["rank"] for t in doc["trials"]] == [1, 2, 3, 4] and scores == sorted(scores)
    assert {t["strategy"] for t in doc["trials"]} == {"odm", "doremi"}
    files = sorted((tmp_path / "sweep.results" / "trials").glob("*.json"))
    assert len(files) == 4
    best = JobSpec.from_yaml((tmp_path / "sweep.results" / "best.yaml").read_text())
    assert best.name == "rec-best" and best.strategy.name == doc["trials"][0]["strategy"]

    # Finished trials are not re-run: no Ray at all when every result is there ...
    code, out, again = cli("sweep", path, "--num-cpus", "2", "--db", db, "--json")
    assert code == 0 and again["ran"] == 0 and again["skipped"] == 4
    assert [t["key"] for t in again["trials"]] == [t["key"] for t in doc["trials"]]
    # ... and only the missing one when a result is lost.
    files[0].unlink()
    code, out, _ = cli("sweep", path, "--num-cpus", "2", "--db", db)
    assert code == 0 and "ran 1, skipped 3 finished" in out
    assert "open-loop proxy" in out


def test_random_search_is_seeded_and_grid_rejects_distributions(tmp_path):
    cfg = {**SWEEP, "search": "random", "samples": 3, "space": [{"strategy": "odm", "params": {"alpha": {"uniform": [0.1, 0.9]}},
                                                                  "cadence": {"update_every": {"int": [5, 30]}}}]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(cfg))
    a, b = trials(SweepConfig.load(path)), trials(SweepConfig.load(path))
    assert [t.sets for t in a] == [t.sets for t in b] and len(a) == 3
    assert all(0.1 <= t.sets["alpha"] <= 0.9 and 5 <= t.sets["cadence.update_every"] <= 30 for t in a)
    path.write_text(yaml.safe_dump({**cfg, "search": "grid"}))
    with pytest.raises(SweepError, match=r"space\[0\]\.params\.alpha: distributions need search: random"):
        trials(SweepConfig.load(path))
    path.write_text(yaml.safe_dump({**SWEEP, "objective": {"kind": "proxy_training"}}))
    with pytest.raises(SweepError, match="trainer, which does not exist yet"):
        SweepConfig.load(path)
