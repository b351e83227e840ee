"""Short CUDA training runs through the pretrain entry point; GPU machines only (marked gpu)."""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import run_pretrain_cli

pytestmark = [
    pytest.mark.gpu,
]


def test_short_cuda_training_plain_loop(write_spec, tmp_path) -> None:
    spec = write_spec("cuda", weighting={"name": "loss", "params": {"burn_in": 5}})
    ckpt = tmp_path / "ckpt"
    record = run_pretrain_cli(
        spec,
        "--device",
        "cuda",
        "--trainer",
        "plain",
        "--layers",
        "4",
        "--hidden",
        "256",
        "--heads",
        "8",
        "--save",
        str(ckpt),
        steps=40,
    )
    assert record["final_step"] == 40 and np.all(np.isfinite(record["losses"]))
    assert np.mean(record["losses"][-5:]) < np.mean(record["losses"][:5]) - 0.3
    assert np.std(record["instance_weights"][-1]) > 0  # the weighted loss ran on the GPU
    resumed = run_pretrain_cli(
        spec,
        "--device",
        "cuda",
        "--trainer",
        "plain",
        "--layers",
        "4",
        "--hidden",
        "256",
        "--heads",
        "8",
        "--load",
        str(ckpt),
        steps=45,
    )
    assert resumed["steps"] == list(range(40, 45))


def test_megatron_trainer_micro_batches_distributed_optimizer_and_resume(write_spec, tmp_path) -> None:
    # megatron-core's schedule with 4 micro-batches, DDP, the distributed optimizer (fp32 master
    # weights, bf16), the plug-in's loader and loss wrapper; a resume from dist_checkpointing
    # continues the same sample sequence and the learning-rate schedule.
    spec = write_spec("cuda-core", weighting={"name": "loss", "params": {"burn_in": 5}})
    ckpt = tmp_path / "ckpt"
    model = ["--layers", "4", "--hidden", "256", "--heads", "8", "--micro-batch-size", "2"]
    whole = run_pretrain_cli(spec, "--device", "cuda", *model, steps=30)
    assert whole["trainer"] == "megatron" and whole["final_step"] == 30
    assert np.all(np.isfinite(whole["losses"]))
    assert np.mean(whole["losses"][-5:]) < np.mean(whole["losses"][:5]) - 0.3
    first = run_pretrain_cli(
        spec, "--device", "cuda", *model, "--save", str(ckpt), "--save-interval", "15", steps=15
    )
    assert first["final_step"] == 15
    resumed = run_pretrain_cli(spec, "--device", "cuda", *model, "--load", str(ckpt), steps=30)
    assert resumed["final_step"] == 30
    np.testing.assert_allclose(resumed["losses"], whole["losses"][15:], rtol=0.02)
