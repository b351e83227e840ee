"""`mixer bench load` on a small scale: it stops by itself and every report is accounted for."""

from __future__ import annotations

import json

from click.testing import CliRunner

from mixer.cli import main


def test_load_bench_counts_every_report_exactly() -> None:
    res = CliRunner().invoke(main, ["bench", "load", "--sessions", "3", "--duration", "3", "--window", "4", "--json"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout.strip().splitlines()[-1])
    assert doc["sessions_connected"] == doc["sessions_reporting"] == 3 and not doc["errors"]
    assert doc["reports_sent"] == doc["reports_acked"] == doc["reports_in_log"] > 0
    assert doc["log_equals_acked"] is True
    assert doc["reports_per_s"] > 0 and 0 < doc["ack_p50_ms"] <= doc["ack_p99_ms"]
    assert doc["server_rss_start_mb"] > 0 and doc["server_rss_end_mb"] > 0
