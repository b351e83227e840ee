"""`mixer bench load` on a small scale: it stops by itself and every report is accounted for,
with either client, at full rate and paced, and against two server processes."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mixer.bench.load import CLIENTS
from mixer.cli import main


def _run(*args: str) -> dict:
    res = CliRunner().invoke(main, ["bench", "load", "--duration", "3", "--window", "4", "--json", *args],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout.strip().splitlines()[-1])


def _accounted(doc: dict, sessions: int) -> None:
    assert doc["sessions_connected"] == doc["sessions_reporting"] == sessions and not doc["errors"], doc["errors"]
    assert doc["reports_sent"] == doc["reports_acked"] == doc["reports_in_log"] > 0
    assert doc["log_equals_acked"] is True
    assert doc["reports_per_s"] > 0 and 0 < doc["ack_p50_ms"] <= doc["ack_p99_ms"]


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("rate", ["0", "60"])
def test_load_bench_counts_every_report_exactly(client: str, rate: str) -> None:
    doc = _run("--sessions", "3", "--client", client, "--rate", rate)
    _accounted(doc, 3)
    assert doc["client"] == client and doc["offered_rate"] == (float(rate) or "full")
    assert doc["server_rss_start_mb"] > 0 and doc["server_rss_end_mb"] > 0
    if float(rate):  # paced: about the offered rate, never above it
        assert doc["reports_sent"] <= float(rate) * doc["duration_s"] + 3 * 4


@pytest.mark.postgres
def test_load_bench_aio_sessions_follow_their_jobs_to_the_owning_worker(pg_url: str) -> None:
    """Two server processes share the port; each session is sent on to its job's owner."""
    doc = _run("--sessions", "4", "--client", "aio", "--servers", "2", "--db", pg_url)
    run = doc["runs"][0]
    assert run["servers"] == 2
    _accounted(run, 4)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--sessions", "0"], "--sessions"),
        (["--duration", "0"], "--duration"),
        (["--duration", "nan"], "duration"),
        (["--servers", "0"], "servers"),
        (["--servers", "two"], "--servers"),
        (["--servers", "2"], "PostgreSQL"),
    ],
)
def test_load_bench_refuses_options_out_of_range_by_name(args: list[str], named: str) -> None:
    res = CliRunner().invoke(main, ["bench", "load", *args])
    assert res.exit_code == 2, res.output
    assert named in res.output, res.output
