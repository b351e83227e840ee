"""Offline fixtures: a job recorded through a real `mixer serve`, and the CLI run in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mixer.bench.launch import ServerProcess
from mixer.cli.bench import bench_replay
from mixer.cli.offline import COMMANDS
from tests.offline.recording import SPEC, record


@pytest.fixture(scope="session")
def recorded(tmp_path_factory):
    """(server, db path): job `rec`, 2 sources x 150 steps, recorded through a real server that keeps running.

    Shared by the offline tests: each names its derived jobs uniquely."""
    workdir = tmp_path_factory.mktemp("offline")
    db = str(workdir / "rec.db")
    srv = ServerProcess(db, workdir).start()
    try:
        record(srv.address, SPEC, steps=150)
        yield srv, db
    finally:
        srv.kill()


@pytest.fixture
def cli():
    """cli("replay", "JOB", "--json", ...) -> (exit code, output, last-line JSON or None)."""
    commands = {**{c.name: c for c in COMMANDS}, "replay-bench": bench_replay}  # mixer bench replay
    runner = CliRunner()

    def run(name: str, *args: str | Path):
        res = runner.invoke(commands[name], [str(a) for a in args], catch_exceptions=False)
        lines = res.stdout.strip().splitlines()
        doc = None
        if "--json" in args and lines:
            try:
                doc = json.loads(lines[-1])
            except json.JSONDecodeError:
                doc = None
        return res.exit_code, res.output, doc

    return run
