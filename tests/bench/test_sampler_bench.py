"""`mixer bench sampler` on a small scale: every (global batch, K) setting is measured and reported."""

from __future__ import annotations

import json

from click.testing import CliRunner

from mixer.cli import main


def test_sampler_bench_reports_every_setting() -> None:
    args = ["bench", "sampler", "--global-batch", "16", "--global-batch", "32", "--domains", "3"]
    args += ["--domains", "5", "--steps", "4", "--change-every", "2", "--dp-size", "4", "--json"]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    doc = json.loads(lines[-1])
    settings = [(r["global_batch"], r["K"]) for r in doc["rows"]]
    assert settings == [(16, 3), (16, 5), (32, 3), (32, 5)]
    for r in doc["rows"]:
        assert r["steps"] == r["old_steps"] == 4
        for key in ("median_ms", "p90_ms", "arrays_median_ms", "old_median_ms", "old_p90_ms", "speedup"):
            assert r[key] is not None and r[key] >= 0, key
        assert "meets_target" not in r  # judged at global batch 4096 only
    table = lines[1:-1]
    assert table[0].split()[:2] == ["batch", "K"] and len(table) == 1 + len(settings)
    for line, (batch, k) in zip(table[1:], settings):
        assert line.split()[:2] == [str(batch), str(k)]


def test_sampler_bench_refuses_an_indivisible_batch() -> None:
    res = CliRunner().invoke(main, ["bench", "sampler", "--global-batch", "10", "--dp-size", "4"])
    assert res.exit_code != 0 and "not divisible" in res.output
