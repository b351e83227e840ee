"""`mixer data synth|prepare` and `mixer pretrain`, mounted as the main group mounts them."""

from __future__ import annotations

import json
from pathlib import Path

import click
import yaml
from click.testing import CliRunner

from mixer.cli import main


def group() -> click.Group:
    return main


def test_synth_prepare_pretrain(tmp_path: Path) -> None:
    runner = CliRunner()
    out = runner.invoke(
        group(), ["data", "synth", str(tmp_path / "corpus"), "--docs-per-domain", "40", "--json"]
    )
    assert out.exit_code == 0, out.output
    assert json.loads(out.output.splitlines()[-1])["domains"] == ["arith", "prose", "noise", "dupes"]

    spec = tmp_path / "job.yaml"
    args = [
        "data",
        "prepare",
        str(tmp_path / "corpus"),
        str(tmp_path / "data"),
        "--spec",
        str(spec),
        "--job",
        "cli",
        "--strategy",
        "odm",
        "--no-progress",
        "--json",
    ]
    out = runner.invoke(group(), args)
    assert out.exit_code == 0, out.output
    prefixes = json.loads(out.output.splitlines()[-1])["prefixes"]
    assert prefixes["noise"]["val"].endswith("noise/val")
    written = yaml.safe_load(spec.read_text())
    assert written["name"] == "cli" and [d["name"] for d in written["domains"]] == sorted(prefixes)

    args = [
        "pretrain",
        "--spec",
        str(spec),
        "--steps",
        "3",
        "--seq-length",
        "16",
        "--global-batch-size",
        "4",
        "--no-progress",
        "--json",
    ]
    out = runner.invoke(group(), args)
    assert out.exit_code == 0, out.output
    summary = json.loads(out.output.splitlines()[-1])
    assert summary["final_step"] == 3 and summary["mixer"] is None


def test_clear_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    out = runner.invoke(group(), ["data", "prepare", str(tmp_path), str(tmp_path / "out")])
    assert out.exit_code != 0 and "no domain folders" in out.output
    spec = tmp_path / "job.yaml"
    spec.write_text(
        yaml.safe_dump({"name": "x", "domains": [{"name": "a", "prefix": str(tmp_path / "nowhere/train")}]})
    )
    out = runner.invoke(group(), ["pretrain", "--spec", str(spec), "--steps", "1"])
    assert out.exit_code != 0 and "domains[0].prefix" in out.output and "no .bin/.idx" in out.output
