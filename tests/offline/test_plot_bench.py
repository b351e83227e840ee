"""`mixer plot` writes a PNG; the replay benchmark reports steps per second per strategy, with and without a binding floor."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from mixer.bench.replay import bench_replay
from mixer.cli import main


def test_plot_writes_a_png_of_several_jobs(recorded, cli, tmp_path):
    _, db = recorded
    assert cli("replay", "rec", "--strategy", "doremi", "--as", "rec-plot-dr", "--db", db)[0] == 0
    out = tmp_path / "jobs.png"
    code, _, doc = cli("plot", "rec", "rec-plot-dr", "-o", out, "--db", db, "--json")
    assert code == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert [j["job"] for j in doc["jobs"]] == ["rec", "rec-plot-dr"]
    assert doc["jobs"][1]["log_job"] == "rec" and doc["jobs"][0]["loss_bins"] > 50


def test_bench_replay_measures_the_strategies_with_and_without_a_binding_floor(cli):
    d = bench_replay(K=22, steps=2000, repeats=1, min_weights=(0.0, 0.01))
    assert [(r["strategy"], r["min_weight"]) for r in d["rows"]] == [
        (label, floor) for label in ("odm", "doremi", "doremi-online") for floor in (0.0, 0.01)
    ]
    assert all(r["steps_per_s"] > 0 and r["versions"] == 201 for r in d["rows"])
    at_floor = {(r["strategy"], r["min_weight"]): r["at_floor"] for r in d["rows"]}
    # DoReMi's paper mode serves the prior (above the floor); online, its weights sit on the floor
    assert at_floor[("doremi", 0.01)] == 0.0 and at_floor[("doremi-online", 0.01)] > 0.9, at_floor
    assert all(at_floor[(label, 0.0)] == 0.0 for label in ("odm", "doremi", "doremi-online"))
    code, _, doc = cli("replay-bench", "--steps", "1000", "--repeats", "1", "--json")
    assert code == 0 and len(doc["rows"]) == 6 and doc["target_steps_per_s"] == 100_000


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--domains", "0"], "--domains"),
        (["--domains", "101"], "--domains"),
        (["--steps", "0"], "--steps"),
        (["--update-every", "0"], "--update-every"),
        (["--steps", "10", "--update-every", "11"], "update_every"),
        (["--repeats", "0"], "--repeats"),
    ],
)
def test_bench_replay_refuses_options_out_of_range_by_name(args, named):
    res = CliRunner().invoke(main, ["bench", "replay", *args])
    assert res.exit_code == 2, res.output
    assert named in res.output, res.output
