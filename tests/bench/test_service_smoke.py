"""`mixer bench service` on a small scale: every report it sends is in the log, its figures are
there and ordered, and out-of-range options are refused by name before anything starts."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mixer.bench.service import MAX_BENCH_SAMPLES, MAX_BENCH_SESSIONS
from mixer.cli import main


def test_service_bench_logs_every_report_and_prints_its_figures() -> None:
    reports, sessions = 60, 2
    res = CliRunner().invoke(
        main,
        ["bench", "service", "--reports", str(reports), "--samples", "256", "--sessions", str(sessions), "--json"],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout.strip().splitlines()[-1])
    assert doc["reports"] == doc["reports_in_log"] == reports
    assert doc["sessions"] == sessions and doc["samples_per_report"] == 256
    assert doc["sample_losses_per_s"] == pytest.approx(doc["reports_per_s"] * 256)
    # /proc counts CPU in clock ticks (10 ms): a run this small may show none
    assert 0 <= doc["server_cpu_us_per_report"] < 1e9
    for kind in ("get_weights_latest", "get_weights_at_step", "push_latency"):
        assert 0 < doc[f"{kind}_p50_ms"] <= doc[f"{kind}_p99_ms"], kind
    assert doc["versions_pushed"] >= 1


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--sessions", "0"], "--sessions"),
        (["--sessions", str(MAX_BENCH_SESSIONS + 1)], "--sessions"),
        (["--samples", "0"], "--samples"),
        (["--samples", str(MAX_BENCH_SAMPLES + 1)], "--samples"),
        (["--reports", "0"], "--reports"),
        (["--reports", "3", "--sessions", "4"], "--reports"),
    ],
)
def test_service_bench_refuses_options_out_of_range_by_name(args: list[str], named: str) -> None:
    res = CliRunner().invoke(main, ["bench", "service", *args])
    assert res.exit_code == 2, res.output
    assert named in res.output, res.output
