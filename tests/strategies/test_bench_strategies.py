"""`mixer bench strategies` measures every registered strategy and prints a table and JSON."""

from __future__ import annotations

import json

import click
from click.testing import CliRunner

from mixer.bench.strategies import run_strategy_bench
from mixer.cli import main
from mixer.strategies import REGISTRY


def cli_group() -> click.Group:
    """The `mixer` command line."""
    return main


def test_bench_times_every_strategy_and_refits_apart() -> None:
    result = run_strategy_bench(Ks=(3,), updates=14, update_every=10, samples=16)
    rows = {r["strategy"]: r for r in result["rows"]}
    assert set(rows) == set(REGISTRY)
    for r in rows.values():
        assert r["K"] == 3 and r["updates"] >= 14, r
        assert 0 <= r["median_ms"] <= r["p99_ms"] <= r["max_ms"], r
        assert 0 <= r["cpu_median_ms"] <= r["cpu_p99_ms"] <= r["cpu_max_ms"], r
    # 140 steps end before ADO's first refit (warm-up 100 + refit period 500); DWM publishes every 100.
    assert rows["ado"]["refits"] == 0 and rows["ado"]["refit_ms"] is None
    assert rows["dwm"]["versions"] >= 1 and rows["static"]["versions"] == 0


def test_bench_strategies_cli_prints_a_table_and_json() -> None:
    out = CliRunner().invoke(
        cli_group(),
        [
            "bench",
            "strategies",
            "-K",
            "2",
            "--strategy",
            "odm",
            "--strategy",
            "ado",
            "--updates",
            "3",
            "--json",
        ],
    )
    assert out.exit_code == 0, out.output
    lines = out.output.strip().splitlines()
    assert any(line.startswith("odm") for line in lines) and any(line.startswith("ado") for line in lines)
    doc = json.loads(lines[-1])
    assert [r["strategy"] for r in doc["rows"]] == ["odm", "ado"] and doc["Ks"] == [2]
    bad = CliRunner().invoke(cli_group(), ["bench", "strategies", "--strategy", "nope"])
    assert bad.exit_code == 1 and "unknown strategy 'nope'" in bad.output
