"""`mixer bench quality --quick` end to end on a small synthetic corpus: the output is complete."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mixer.bench.corpus import NOISE_ALPHABET, noise_corpus
from mixer.bench.quality import _mean_weight
from mixer.bench.quality_config import QUICK_STRATEGIES
from mixer.bench.quality_plot import ALPHA, paired_test, steps_to_reach, summarize
from mixer.cli.bench import bench_quality
from mixer.megatron.corpus import write_synthetic_corpus


def test_steps_to_reach_interpolates_between_evaluations() -> None:
    history = [[10, [4.0, 4.0]], [20, [3.0, 3.0]], [30, [2.0, 2.0]]]
    assert steps_to_reach(history, 2.5) == pytest.approx(25.0)
    assert steps_to_reach(history, 3.0) == pytest.approx(20.0)
    assert steps_to_reach(history, 4.5) == pytest.approx(10.0)
    assert steps_to_reach(history, 1.0) is None


def _run(strategy: str, seed: int, finals: list[float], detached: float | None = None) -> dict:
    hist = [[50, [f + 1 for f in finals]], [100, finals]]
    return {
        "strategy": strategy,
        "seed": seed,
        "status": "ok",
        "final_mean": sum(finals) / len(finals),
        "final_worst": max(finals),
        "worst_domain": finals.index(max(finals)),
        "val_history": hist,
        "step_time_s": 0.2,
        "step_time_attached_s": 0.11 if detached else None,
        "step_time_detached_s": detached,
        "baseline_step_time_s": detached or 0.1,
        "versions": 1,
        "wall_s": 1.0,
    }


def test_summarize_pairs_seeds_and_flags_noise() -> None:
    runs = [
        _run("uniform", 0, [2.0, 3.0], 0.1),
        _run("uniform", 1, [2.1, 3.1], 0.1),
        _run("odm", 0, [1.7, 2.7]),
        _run("odm", 1, [1.8, 2.8]),
        {"strategy": "dga", "seed": 0, "status": "not run", "reason": "no probe"},
    ]
    summary, attach = summarize(runs, ["uniform", "odm", "dga"], ["a", "b"])
    odm = summary["odm"]
    assert odm["paired_diff_mean"]["mean"] == pytest.approx(-0.3)
    assert odm["paired_diff_mean"]["n"] == 2 and odm["paired_diff_mean"]["std"] == pytest.approx(
        0.0, abs=1e-9
    )
    assert odm["worst_domain"] == "b"
    assert odm["overhead_vs_detached"] == pytest.approx(1.0)
    # Identical per-seed differences: the paired test is decisive however much the seeds themselves differ.
    assert odm["verdict"].startswith("better than uniform (paired t-test p = ")
    assert float(odm["verdict"].split("p = ")[1].split(";")[0]) < 1e-6
    assert summary["uniform"]["steps_to_uniform"] == {"0": 1.0, "1": 1.0}
    assert summary["dga"]["status"] == "not run: no probe"
    assert attach["per_seed"]["0"]["overhead"] == pytest.approx(0.1)
    assert math.isclose(attach["uniform_seed_spread"], 0.0707, rel_tol=1e-2)


def test_paired_test_matches_a_float64_t_statistic() -> None:
    # -0.0204 +/- 0.0030 over 3 seeds: t = mean / (sd / sqrt(3)); two-sided p from Student's t, 2 dof.
    diffs = [-0.0204 + 0.0030, -0.0204, -0.0204 - 0.0030]
    out = paired_test(diffs)
    t = -0.0204 / (0.0030 / math.sqrt(3))
    # Student's t with 2 degrees of freedom has the closed-form tail P(|T| > t) = 1 - t / sqrt(2 + t^2).
    assert out["p"] == pytest.approx(1 - abs(t) / math.sqrt(2 + t * t), rel=1e-9)
    # t grows as sqrt(n): 9.6 at n = 2 is below t(0.975, 1 dof) = 12.7, 11.8 at n = 3 above 4.30.
    assert out["seeds_needed"] == 3
    small = paired_test([-0.001, 0.002, -0.003])
    assert small["p"] > ALPHA and small["seeds_needed"] > 3


@pytest.mark.slow
def test_quality_quick_writes_a_complete_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = tmp_path / "corpus"
    write_synthetic_corpus(corpus, seed=0, docs_per_domain=120)
    # The default --out is relative to the working directory; the service it starts runs elsewhere.
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "mixer-bench-quality"
    result = CliRunner().invoke(
        bench_quality,
        ["--quick", "--corpus", str(corpus), "--noise-domains", "1", "--json"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("command", "config", "machine", "domains", "summary", "attach_overhead", "not_run", "files"):
        assert key in doc, key
    assert doc["strategies"] == list(QUICK_STRATEGIES)
    assert doc["control_domains"] == ["noise-0"] and doc["domains"][-1] == "noise-0"
    assert not doc["not_run"], doc["not_run"]
    for name in QUICK_STRATEGIES:
        s = doc["summary"][name]
        assert s["status"] == "ok" and s["seeds"] == [0]
        assert math.isfinite(s["final_mean"]) and s["final_worst"] >= s["final_mean"]
        assert s["step_time_s"] > 0 and "0" in s["steps_to_uniform"]
    assert doc["summary"]["uniform"]["paired_diff_mean"]["mean"] == 0.0
    assert doc["attach_overhead"]["per_seed"]["0"]["overhead"] is not None

    full = json.loads((out / "result.json").read_text())
    assert {r["strategy"] for r in full["runs"]} == set(QUICK_STRATEGIES)
    doremi = next(r for r in full["runs"] if r["strategy"] == "doremi")
    assert doremi["signals"]["excess_loss_sum"] > 0  # the reference forward really ran
    assert all(r["val_history"] and r["trajectory"] for r in full["runs"])
    # the control domain trains but is not scored: K - 1 scored losses, one control loss per evaluation
    assert full["scored_domains"] == [d for d in full["domains"] if d != "noise-0"]
    for r in full["runs"]:
        assert all(len(v) == len(full["domains"]) - 1 for _, v in r["val_history"])
        assert all(len(v) == 1 and v[0] > 3.0 for _, v in r["control_val_history"])  # unlearnable
        assert 0 < r["control_weight"] < 1
    assert doc["summary"]["uniform"]["control_weight"] == pytest.approx(1 / len(full["domains"]))
    png = out / "quality.png"
    assert png.is_file() and png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "table.md").read_text()
    rows = [
        line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| strategy")
    ]
    assert [r.split("|")[1].strip() for r in rows] == list(QUICK_STRATEGIES)
    assert "weight on noise" in table and "noise-0" in table


def test_noise_corpus_is_unlearnable_and_deterministic(tmp_path: Path) -> None:
    a = noise_corpus(tmp_path / "a", 2, train_bytes=20_000, val_bytes=4_096)
    b = noise_corpus(tmp_path / "b", 2, train_bytes=20_000, val_bytes=4_096)
    assert sorted(d.name for d in a.iterdir()) == ["noise-0", "noise-1"]
    for d in ("noise-0", "noise-1"):
        for split in ("train", "val"):
            assert (a / d / f"{split}.jsonl").read_bytes() == (b / d / f"{split}.jsonl").read_bytes()
    docs = [json.loads(line)["text"] for line in (a / "noise-0" / "train.jsonl").read_text().splitlines()]
    text = "".join(docs)
    assert len(docs) == 9 and set(text) <= set(NOISE_ALPHABET)
    counts = np.bincount(np.frombuffer(text.encode(), np.uint8) - 32, minlength=95)
    assert counts.min() > 0.5 * counts.mean()  # uniform over the 95 printable characters
    assert (a / "noise-0" / "train.jsonl").read_bytes() != (a / "noise-1" / "train.jsonl").read_bytes()


def test_mean_weight_integrates_the_trajectory() -> None:
    # weights [a, b, noise]: 0.2 on noise for steps 0-49, 0.6 for 50-99
    traj = [[0, [0.4, 0.4, 0.2]], [50, [0.2, 0.2, 0.6]]]
    assert _mean_weight(traj, (2,), 100) == pytest.approx(0.4)
    assert _mean_weight(traj, (0, 1), 100) == pytest.approx(0.6)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--strategies", "uniform,nope"], "unknown strategy 'nope'"),
        (["--strategies", "uniform,agent"], "strategy agent needs --agent PATH"),
        (["--steps", "1"], "--steps"),
        (["--set", "doremi"], "expected STRATEGY.PARAM=VALUE"),
    ],
)
def test_quality_refuses_bad_settings_before_running(tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(bench_quality, [*args, "--out", str(out)])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not out.exists()  # nothing started, nothing written


def test_quality_settings_from_a_config_file(tmp_path: Path) -> None:
    from mixer.bench.quality_config import QualityRun
    from mixer.config import check, override

    f = tmp_path / "q.yaml"
    f.write_text("quick: true\nsteps: 12\nseeds: 2\nstrategies: uniform,odm\n")
    result = CliRunner().invoke(bench_quality, ["--config", str(f), "--strategies", "nope"])
    assert result.exit_code == 2 and "unknown strategy 'nope'" in result.output  # the command line wins
    run = check(override(QualityRun(), {"quick": True, "steps": 12, "seeds": 2, "strategies": "uniform,odm"}))
    assert (run.model().steps, run.preset_name, run.strategy_names()) == (12, "quick", ["uniform", "odm"])
    assert "--steps 12 --seeds 2" in run.command_line(tmp_path, ())
