"""`mixer demo --steps 50`: corpus, embedded service, real megatron-core training, table."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "mixer.cli", "demo", "--steps", "50", "--workdir", str(tmp_path), "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["domains"] == ["arith", "prose", "noise", "dupes"]
    assert result["all_acknowledged"]
    # 50 training reports and one validation report, each acknowledged and logged once.
    assert result["reports_logged"] == 51
    assert [v["version"] for v in result["versions"]] == list(range(len(result["versions"])))
    assert len(result["versions"]) == 6  # the initial version and one per 10 steps
    assert all(abs(sum(v["weights"]) - 1) < 1e-9 for v in result["versions"])
    assert all(x == x and x > 0 for x in result["final_val_loss"])
    assert (tmp_path / "mixer.db").exists()
