"""A short CUDA training run through the pretrain entry point (bf16, Float16Module); GPU machines only."""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import run_pretrain_cli

pytestmark = [
    pytest.mark.gpu,
]


def test_short_cuda_training(write_spec, tmp_path) -> None:
    spec = write_spec("cuda", weighting={"name": "loss", "params": {"burn_in": 5}})
    ckpt = tmp_path / "ckpt"
    record = run_pretrain_cli(
        spec,
        "--device",
        "cuda",
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
