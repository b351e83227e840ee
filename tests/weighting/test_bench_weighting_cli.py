"""`mixer bench weighting` wraps run_bench: a table, targets judged at batch 4096, JSON last."""

from __future__ import annotations

import json

import click
from click.testing import CliRunner

from mixer.bench.weighting import format_table, run_weighting_bench
from mixer.cli.bench import bench


def bench_group() -> click.Group:
    return bench


def test_weighting_bench_cli_json() -> None:
    out = CliRunner().invoke(
        bench_group(), ["weighting", "--batch", "128", "--threads", "1", "--repeats", "2", "--json"]
    )
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output.strip().splitlines()[-1])
    assert doc["batch"] == 128 and doc["threads"] == 1 and doc["meets_targets"] is None
    assert set(doc["targets_ms"]) <= set(doc["median_ms"]) and all(v > 0 for v in doc["median_ms"].values())
    assert "DWM train step" in out.output


def test_targets_are_judged_at_batch_4096() -> None:
    result = run_weighting_bench(batch=4096, threads=1, repeats=1)
    assert set(result["meets_targets"]) == set(result["targets_ms"])
    judged = [
        line for line in format_table(result).splitlines() if line.endswith(("  ok", "  MISSES TARGET"))
    ]
    assert len(judged) == len(result["targets_ms"])
