"""`mixer plot` writes a PNG; the replay benchmark reports steps per second for two strategies."""

from __future__ import annotations

from mixer.replay import bench_replay


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


def test_bench_replay_measures_both_strategies(cli):
    d = bench_replay(K=22, steps=2000, repeats=1, min_weights=(0.0,))
    assert [r["strategy"] for r in d["rows"]] == ["odm", "doremi"]
    assert all(r["steps_per_s"] > 0 and r["versions"] == 201 for r in d["rows"])
    code, _, doc = cli("replay-bench", "--steps", "1000", "--repeats", "1", "--json")
    assert code == 0 and len(doc["rows"]) == 4 and doc["target_steps_per_s"] == 100_000
