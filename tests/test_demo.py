"""`mixer demo --steps 50`: corpus, embedded service, two real megatron-core runs side by side."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from mixer.megatron.corpus import DOMAINS


@pytest.mark.slow
def test_demo_runs_both_jobs_end_to_end(tmp_path):
    steps = 50
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mixer.cli",
            "demo",
            "--steps",
            str(steps),
            "--workdir",
            str(tmp_path),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["domains"] == list(DOMAINS)
    assert set(result["jobs"]) == {"uniform", result["strategy"]}
    # The page's address is printed while it runs (stderr with --json).
    assert result["page"].startswith("http://127.0.0.1:") and f"live: {result['page']}" in out.stderr
    for run in result["jobs"].values():
        assert run["all_acknowledged"]
        # every training step's report and every validation report, each logged once
        assert run["reports_logged"] == steps + run["evaluations"] and run["evaluations"] >= 1
        assert len(run["final_val_loss"]) == len(DOMAINS)
        assert all(math.isfinite(x) and x > 0 for x in run["final_val_loss"])
    versions = result["versions"]
    assert [v["version"] for v in versions] == list(range(len(versions)))
    assert len(versions) == 1 + steps // result["update_every"]  # the initial version and one per window
    assert all(abs(sum(v["weights"]) - 1) < 1e-9 for v in versions)
    assert abs(sum(result["mean_weights"]) - 1) < 1e-9
    assert (tmp_path / "mixer.db").exists()


def test_demo_summary_prints_the_table_and_both_losses():
    """The closing report from a result: the weight table, a row per job, and their difference."""
    from mixer.cli.demo import summary_lines

    domains = list(DOMAINS)
    K = len(domains)
    uniform = [1.0 + i for i in range(K)]
    strategy = [x - 0.25 for x in uniform]
    versions = [{"version": v, "effective_step": 10 * v, "weights": [1.0 / K] * K} for v in range(3)]
    result = {
        "domains": domains,
        "strategy": "s",
        "steps": 30,
        "seconds": 1.0,
        "versions": versions,
        "mean_weights": [1.0 / K] * K,
        "jobs": {
            "uniform": {
                "job": "d-uniform",
                "final_val_loss": uniform,
                "reports_logged": 31,
                "all_acknowledged": True,
            },
            "s": {"job": "d-s", "final_val_loss": strategy, "reports_logged": 31, "all_acknowledged": True},
        },
    }
    text = "\n".join(summary_lines(result))
    assert all(f"{v['version']:>7} {v['effective_step']:>7}" in text for v in versions)
    rows = {
        line.split()[0]: line.split()[1:]
        for line in text.splitlines()
        if line.split()[:1] in (["uniform"], ["s"], ["change"])
    }
    assert [float(x) for x in rows["uniform"]] == pytest.approx(uniform, abs=1e-3)
    assert [float(x) for x in rows["s"]] == pytest.approx(strategy, abs=1e-3)
    assert [float(x) for x in rows["change"]] == pytest.approx(
        [b - a for a, b in zip(uniform, strategy)], abs=1e-3
    )
