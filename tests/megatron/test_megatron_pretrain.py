"""The pretraining entry point: resume determinism, instance weighting, and an outage of the service."""

from __future__ import annotations

import threading
from pathlib import Path

import click
import numpy as np
import pytest
from _helpers import run_pretrain_cli, small_options

from mixer.client import MixerClient
from mixer.megatron.pretrain import run_pretrain, val_prefix


def test_val_prefix_convention() -> None:
    assert val_prefix("/data/web/train") == "/data/web/val"
    assert val_prefix("/data/web_text_document") == "/data/web_text_document_val"


def test_resume_through_the_entry_point_is_exact(write_spec, tmp_path: Path) -> None:
    spec = write_spec("resume")
    ckpt = tmp_path / "ckpt"
    full = run_pretrain_cli(spec, "--save", str(ckpt), "--save-interval", "15", steps=30)
    assert [Path(c).name for c in full["checkpoints"]] == ["step_00000015", "step_00000030"]
    resumed = run_pretrain_cli(spec, "--load", str(ckpt / "step_00000015"), steps=30)
    assert resumed["steps"] == list(range(15, 30))
    assert resumed["sample_ids"] == full["sample_ids"][15:]
    assert resumed["losses"] == full["losses"][15:]  # bit-identical, not merely close
    assert np.mean(full["losses"][-5:]) < np.mean(full["losses"][:5]) - 0.3
    # A checkpoint of another job spec is refused, unless forced.
    other = write_spec("resume-other", cadence={"update_every": 7})
    with pytest.raises(click.ClickException, match="--force-resume"):
        run_pretrain_cli(other, "--load", str(ckpt), steps=31)
    assert run_pretrain_cli(other, "--load", str(ckpt), "--force-resume", steps=31)["steps"] == [30]


@pytest.mark.slow
def test_strict_resume_replays_the_recorded_versions(write_spec, server, tmp_path: Path) -> None:
    # A scheduled static mixture changes weights at steps 8 and 18; in strict mode every step waits
    # for the version in force, so a resumed run gets the recorded versions step for step.
    schedule = [
        {"step": 0, "weights": [1, 1, 1, 1]},
        {"step": 8, "weights": [5, 1, 1, 1]},
        {"step": 18, "weights": [1, 1, 5, 1]},
    ]
    spec = write_spec("strict", {"name": "static", "params": {"mode": "schedule", "schedule": schedule}})
    ckpt = tmp_path / "ckpt"
    args = ("--mixer", server.address, "--strict")
    full = run_pretrain_cli(spec, *args, "--save", str(ckpt), "--save-interval", "15", steps=30)
    assert len(set(full["versions"])) >= 3, full["versions"]
    resumed = run_pretrain_cli(spec, *args, "--load", str(ckpt / "step_00000015"), steps=30)
    assert resumed["versions"] == full["versions"][15:]
    assert resumed["sample_ids"] == full["sample_ids"][15:]
    assert resumed["losses"] == full["losses"][15:]
    assert full["all_reports_acknowledged"] and resumed["all_reports_acknowledged"]


def test_instance_weighting_from_the_job(write_spec, server) -> None:
    spec = write_spec("loss-weighting", weighting={"name": "loss", "params": {"burn_in": 3, "r": 0.2}})
    record = run_pretrain_cli(spec, "--mixer", server.address, steps=8)
    weights = [np.asarray(w) for w in record["instance_weights"]]
    assert len(weights) == 8
    for step, w in enumerate(weights):
        assert w.shape == (8,) and w.sum() == pytest.approx(8.0, rel=1e-5)
        if step < 3:
            assert np.all(w == 1.0)  # burn-in: the plain token-mean loss
        else:
            assert w.std() > 0.05  # the weighted loss path: low-loss samples weigh less
    with MixerClient(server.address) as client:
        assert client.get_job("loss-weighting").weighting == "loss"


@pytest.mark.slow
def test_outage_training_goes_on_and_reports_arrive_later(write_spec, server) -> None:
    spec = write_spec("outage", "odm", cadence={"update_every": 3, "min_weight": 0.02})
    restart: list[threading.Thread] = []

    def on_step(step: int) -> None:
        if step == 15:
            server.kill()
        if step == 40:  # bring it back while training goes on; its start takes a few seconds
            restart.append(threading.Thread(target=server.start))
            restart[0].start()

    record = run_pretrain(
        small_options(spec, mixer=server.address, steps=60, flush_timeout=90), on_step=on_step
    )
    restart[0].join()
    versions = record["versions"]
    assert record["final_step"] == 60 and record["steps"] == list(range(60))
    assert versions[14] > 0  # versions arrived before the outage
    assert len(set(versions[20:41])) == 1  # then it trained on its last weights
    assert record["all_reports_acknowledged"]
    with MixerClient(server.address) as client:
        # Every training report and the final validation arrived once the service was back.
        assert client.get_job("outage").report_count == 60 + len(record["val_history"])


def test_settings_from_a_file_and_set_reach_the_run_and_its_record(write_spec, tmp_path: Path) -> None:
    """--config FILE and --set reach the training loop; the record carries the resolved tree."""
    import yaml

    spec = write_spec("config-tree")
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump({"train": {"weight_decay": 0.0, "model": {"hidden_size": 32}}}))
    record = run_pretrain_cli(
        spec, "--config", str(cfg_file), "--set", "train.betas=[0.8, 0.9]", "--heads", "2", steps=3
    )
    train = record["config"]["train"]
    assert (train["weight_decay"], train["betas"], train["model"]["hidden_size"]) == (0.0, [0.8, 0.9], 32)
    assert train["model"]["num_attention_heads"] == 2
    written = yaml.safe_load(spec.read_text())
    assert train["seed"] == written.get("seed", 0)  # no --seed: the job spec's
    with pytest.raises(click.ClickException, match=r"train.min_lr \(--min-lr\): must be >= 0"):
        run_pretrain_cli(spec, "--set", "train.min_lr=-1", steps=3)
