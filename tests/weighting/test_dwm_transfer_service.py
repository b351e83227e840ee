"""DWM through a real server: a job learns its weighting model stage by stage and replay re-derives
every version bit for bit; its model, exported from the newest version, starts a second job whose
reports come from another LLM (other loss levels), which keeps learning from it and replays bit for
bit too; a third job applies it frozen, and the worker weights with exactly that model."""

from __future__ import annotations

import base64
import json

import numpy as np
import torch

from mixer.client import MixerClient
from mixer.megatron.instance import InstanceWeighting
from mixer.replay import verify
from mixer.signals import Report
from mixer.spec import JobSpec
from mixer.store import Store
from mixer.transfer import export_weighting_model, resolve_init_from, write_weighting_model
from mixer.weighting import dwm

K = 3
SAMPLES = 16
STAGE = 6
LR = 1e-2


def report(step: int, rng: np.random.Generator, loss_offset: float) -> Report:
    """Per-sample losses and alignments: validation favours the low-loss samples."""
    domain = rng.integers(0, K, SAMPLES)
    loss = loss_offset + np.array([2.0, 2.5, 3.5])[domain] + rng.gamma(2.0, 0.3, SAMPLES)
    return Report(
        step=step,
        source="w0",
        sample_loss=loss.astype(np.float32),
        sample_domain=domain.astype(np.int32),
        sample_id=np.arange(SAMPLES, dtype=np.int64) + step * SAMPLES,
        sample_align=(loss_offset + 3.0 - loss + rng.normal(0.0, 0.2, SAMPLES)).astype(np.float32),
    )


def spec(name: str, **weighting) -> dict:
    return {
        "name": name,
        "domains": [f"d{i}" for i in range(K)],
        "strategy": {"name": "dwm", "params": {"stage_steps": STAGE}},
        "cadence": {"update_every": 2, "delay": 1},
        "seed": 3,
        "weighting": {"name": "dwm", "params": {"hidden": 8, "lr": LR, "total_steps": 48, **weighting}},
    }


def run(address: str, job: dict, steps: int, loss_offset: float) -> list:
    rng = np.random.default_rng(0)
    with MixerClient(address) as c:
        _, created = c.create_job(job)
        assert created
        for step in range(steps):
            c.report(job["name"], report(step, rng, loss_offset))
        return c.list_versions(job["name"])


def replays_bit_for_bit(db: str, name: str, versions: list) -> None:
    store = Store(db)
    try:
        result = verify(store, name)
    finally:
        store.close()
    assert result.ok, result.to_dict()
    assert result.versions_checked == len(versions)


def test_learn_export_transfer_and_replay_through_a_real_server(server, tmp_path) -> None:
    source = run(server.address, spec("dwm-small"), 4 * STAGE, loss_offset=1.0)
    models = [v for v in source if v.blob]
    assert len(models) >= 3, f"{len(models)} published models from 4 stages"
    assert [v.params["stage"] for v in models] == list(range(len(models)))
    assert all(dwm.model_of(dwm.from_bytes(v.blob)[0]) == "batch-context" for v in models)
    replays_bit_for_bit(server.db, "dwm-small", source)

    store = Store(server.db)
    try:
        blob = export_weighting_model(store, "dwm-small")
        assert blob == models[-1].blob
        path = tmp_path / "dwm-small.safetensors"
        assert write_weighting_model(store, "dwm-small", path) == len(blob)
    finally:
        store.close()
    learned, _ = dwm.from_bytes(blob)
    # The same through the command line: export the model, create a job whose spec names the file.
    from click.testing import CliRunner

    from mixer.cli import main

    cli_path = tmp_path / "cli-model.safetensors"
    out = CliRunner().invoke(
        main,
        ["export", "dwm-small", "--what", "weighting-model", "-o", str(cli_path), "--db", server.db],
        catch_exceptions=False,
    )
    assert out.exit_code == 0, out.output
    assert cli_path.read_bytes() == blob
    spec_file = tmp_path / "cli-job.yaml"
    spec_file.write_text(json.dumps(spec("dwm-cli", init_from=cli_path.name, frozen=True)))
    out = CliRunner().invoke(
        main, ["job", "create", str(spec_file), "--address", server.address], catch_exceptions=False
    )
    assert out.exit_code == 0, out.output
    with MixerClient(server.address) as c:
        stored = JobSpec.from_json(c.get_job("dwm-cli").spec_json)
    assert base64.b64decode(stored.weighting.params["init_from"]) == blob

    # Another LLM (lower losses): the job starts from the learned model and keeps learning.
    target = run(
        server.address, resolve_init_from(spec("dwm-large", init_from=path.name), tmp_path), 2 * STAGE, 0.0
    )
    first = dwm.from_bytes(next(v for v in target if v.blob).blob)[0]
    updates = next(v for v in target if v.blob).params["phi_updates"]
    fresh = dwm.init_params(first["W1"].shape[0], 8, seed=3)
    # An Adam step moves each entry by at most ~lr: the job started from the learned model.
    moved = max(np.abs(first[k] - learned[k]).max() for k in dwm.BATCH_KEYS)
    assert 0 < moved <= 3 * LR * updates
    assert 3 * np.abs(first["W1"] - learned["W1"]).mean() < np.abs(first["W1"] - fresh["W1"]).mean()
    replays_bit_for_bit(server.db, "dwm-large", target)

    # Frozen: nothing is trained or published; workers weight with the learned model throughout.
    frozen = resolve_init_from(spec("dwm-frozen", init_from=path.name, frozen=True), tmp_path)
    versions = run(server.address, frozen, 2 * STAGE, 0.0)
    assert not any(v.blob for v in versions)
    worker = InstanceWeighting(JobSpec.from_dict(frozen))
    loss, domain = torch.tensor([2.0, 3.0, 4.5, 2.2]), torch.tensor([0, 1, 2, 0])
    got = worker.weights(5, loss, domain)
    fb = dwm.FeatureBuilder.from_params(K, worker.params)
    want = dwm.evaluate(learned, fb.build(loss, domain, 5))
    assert torch.equal(got, want) and got.std() > 0
