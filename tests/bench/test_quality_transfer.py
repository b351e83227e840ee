"""`mixer bench quality` with dwm-transfer: a small model's dwm run learns the weighting model, which is
exported and starts the run's own model, frozen; or a weighting model file given with --set."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mixer.bench.quality_config import PRESETS, TRANSFER_SOURCE, job_spec
from mixer.cli.bench import bench_quality
from mixer.megatron.corpus import write_synthetic_corpus
from mixer.spec import JobSpec
from mixer.store import Store
from mixer.transfer import export_weighting_model


def test_dwm_overrides_go_to_the_weighting_model_and_the_strategy() -> None:
    cfg = PRESETS["quick"]
    overrides = {"dwm": {"hidden": 8, "lr": 0.01, "stages": 2}}
    spec = job_spec("dwm", "j", 0, {"a": "pa", "b": "pb"}, {"a": 1, "b": 1}, cfg, overrides)
    assert spec["strategy"] == {"name": "dwm", "params": {"stages": 2}}
    params = spec["weighting"]["params"]
    assert (params["hidden"], params["lr"], params["total_steps"], params["seq_len"]) == (
        8,
        0.01,
        cfg.steps,
        cfg.seq,
    )
    transfer = job_spec("dwm-transfer", "j", 0, {"a": "pa", "b": "pb"}, {"a": 1, "b": 1}, cfg, {})
    assert transfer["weighting"]["params"]["frozen"] is True


def _stored_spec(db: Path, job: str) -> JobSpec:
    store = Store(str(db))
    try:
        rec = store.get_job(job)
        assert rec is not None, job
        return JobSpec.from_json(rec.spec_json)
    finally:
        store.close()


def _quality(tmp_path: Path, corpus: Path, out: str, *args: str) -> dict:
    result = CliRunner().invoke(
        bench_quality,
        ["--quick", "--corpus", str(corpus), "--strategies", "dwm-transfer", "--out", out, "--json", *args],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    full = json.loads((tmp_path / out / "result.json").read_text())
    assert not full["not_run"], full["not_run"]
    return next(r for r in full["runs"] if r["strategy"] == "dwm-transfer")


@pytest.mark.slow
def test_dwm_transfer_learns_small_exports_and_starts_the_run_from_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus = tmp_path / "corpus"
    write_synthetic_corpus(corpus, seed=0, docs_per_domain=120)
    monkeypatch.chdir(tmp_path)
    run = _quality(tmp_path, corpus, "learned", "--steps", "20")
    source = run["transfer_source"]
    small = PRESETS[TRANSFER_SOURCE]
    assert (source["preset"], source["layers"], source["hidden"], source["steps"]) == (
        TRANSFER_SOURCE,
        small.layers,
        small.hidden,
        20,
    )
    db = tmp_path / "learned" / "mixer.db"
    store = Store(str(db))
    try:  # the file is what `mixer export --what weighting-model` gives for the source job
        exported = export_weighting_model(store, source["job"])
    finally:
        store.close()
    model = Path(source["model"])
    assert model.read_bytes() == exported and source["model_bytes"] == len(exported)
    assert _stored_spec(db, source["job"]).weighting.params["seq_len"] == small.seq
    target = _stored_spec(db, run["job"]).weighting.params
    assert base64.b64decode(target["init_from"]) == exported and target["frozen"] is True
    assert run["versions"] == 1  # frozen: the service publishes no model of its own

    # A weighting model file given on the command line: no source run, the job starts from that file.
    given = tmp_path / "given.safetensors"
    given.write_bytes(exported)
    run = _quality(
        tmp_path, corpus, "given", "--steps", "10", "--set", f"dwm-transfer.init_from={given.name}"
    )
    assert "transfer_source" not in run
    target = _stored_spec(tmp_path / "given" / "mixer.db", run["job"]).weighting.params
    assert base64.b64decode(target["init_from"]) == exported


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--set", "dwm-transfer.init_from=nope.safetensors"],
            "dwm-transfer.init_from=nope.safetensors: no such file",
        ),
        (["--set", "dwm.frozen=true"], "needs --set dwm.init_from=FILE"),
    ],
)
def test_transfer_settings_are_refused_before_running(tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(bench_quality, [*args, "--out", str(out)])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not out.exists()
