"""Loss-based reweighting against the Sow et al. reference vectors (tests/conformance)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mixer.weighting.loss_based import (
    loss_weights,
    loss_weights_np,
    normalise_np,
    reweighted_loss,
    strategy_value_np,
    weights_for_step,
)
from tests.conformance_dir import conformance_dir

FILE = "sow_loss_reweighting.json"


@pytest.fixture(scope="module")
def vectors() -> dict:
    return json.loads((conformance_dir(FILE) / FILE).read_text())


def cases(vectors: dict):
    delta = vectors["hyperparameters"]["delta"]
    for batch in vectors["inputs"]["batches"]:
        for strategy, by_r in vectors["expected"][batch["name"]]["by_strategy"].items():
            for r, expected in by_r.items():
                yield batch, strategy, float(r), delta, expected


def close(
    got, expected, tol: dict, where: str = "", *, rtol: float | None = None, atol: float | None = None
) -> None:
    """|got - expected| <= atol + rtol |expected|, the file's rule."""
    np.testing.assert_allclose(
        np.asarray(got, dtype=np.float64),
        np.asarray(expected, dtype=np.float64),
        rtol=tol["rtol"] if rtol is None else rtol,
        atol=tol["atol"] if atol is None else atol,
        err_msg=where,
    )


def test_file_covers_every_strategy_and_r(vectors: dict) -> None:
    hp = vectors["hyperparameters"]
    n = sum(1 for _ in cases(vectors))
    assert (
        n
        == len(vectors["inputs"]["batches"]) * len(hp["strategies run"]) * len(hp["kl_reg (r) values run"])
        == 48
    )


def test_numpy_reference_matches_h_f_weights_and_loss(vectors: dict) -> None:
    tol = vectors["tolerance"]
    for batch, strategy, r, delta, expected in cases(vectors):
        where = f"{batch['name']}/{strategy}/r={r}"
        losses = np.array(batch["per_sample_loss"])
        tokens = np.array(batch["num_active_tokens"])
        h = normalise_np(losses, delta)
        close(h, expected["normalized_loss_h"], tol, f"{where} h")
        close(strategy_value_np(h, strategy, delta), expected["strategy_value_f"], tol, f"{where} f")
        w = loss_weights_np(losses, strategy, delta, r)
        assert w.sum() == pytest.approx(len(losses), rel=1e-12), where
        # The file's weights sum to 1 over the batch; ours sum to the batch size.
        close(w / len(losses), expected["weights"], tol, f"{where} weights")
        loss = reweighted_loss(torch.tensor(losses), torch.tensor(tokens), torch.tensor(w))
        close(loss.item(), expected["final_scalar_loss"], tol, f"{where} loss")


def test_torch_float64_matches_at_file_tolerance(vectors: dict) -> None:
    tol = vectors["tolerance"]
    for batch, strategy, r, delta, expected in cases(vectors):
        where = f"{batch['name']}/{strategy}/r={r}"
        losses = torch.tensor(batch["per_sample_loss"], dtype=torch.float64)
        tokens = torch.tensor(batch["num_active_tokens"])
        w = loss_weights(losses, strategy, delta, r)
        assert w.dtype == torch.float64
        close(w.numpy() / len(losses), expected["weights"], tol, where)
        close(reweighted_loss(losses, tokens, w).item(), expected["final_scalar_loss"], tol, where)


def test_torch_float32_matches_at_float32_tolerance(vectors: dict) -> None:
    # The file's note: ~1e-6 relative in float32, except tight_cluster (cancellation): rtol 1e-4.
    for batch, strategy, r, delta, expected in cases(vectors):
        rtol = 1e-4 if batch["name"] == "tight_cluster" else 1e-5
        losses = torch.tensor(batch["per_sample_loss"], dtype=torch.float32)
        tokens = torch.tensor(batch["num_active_tokens"])
        w = loss_weights(losses, strategy, delta, r)
        assert w.dtype == torch.float32
        where = f"{batch['name']}/{strategy}/r={r}"
        close(w.double().numpy() / len(losses), expected["weights"], {}, where, rtol=rtol, atol=1e-7)
        close(
            reweighted_loss(losses, tokens, w).item(),
            expected["final_scalar_loss"],
            {},
            where,
            rtol=rtol,
            atol=1e-6,
        )


def test_burn_in_path_matches_no_reweighting(vectors: dict) -> None:
    tol = vectors["tolerance"]
    burn_in = vectors["hyperparameters"]["defaults"]["burnout_steps"]
    for batch in vectors["inputs"]["batches"]:
        expected = vectors["expected"][batch["name"]]["no_reweighting"]
        losses = torch.tensor(batch["per_sample_loss"], dtype=torch.float64)
        tokens = torch.tensor(batch["num_active_tokens"])
        close((tokens.double() / tokens.sum()).numpy(), expected["len_norms"], tol)
        close(reweighted_loss(losses, tokens).item(), expected["final_scalar_loss"], tol)
        w = weights_for_step(burn_in - 1, losses, {"method": "mid", "burn_in": burn_in})
        assert torch.equal(w, torch.ones_like(losses))
        close(reweighted_loss(losses, tokens, w).item(), expected["final_scalar_loss"], tol)


def test_all_equal_batch_gives_uniform_weights(vectors: dict) -> None:
    batch = next(b for b in vectors["inputs"]["batches"] if b["name"] == "all_equal")
    for strategy in vectors["hyperparameters"]["strategies run"]:
        for dtype in (torch.float32, torch.float64):
            w = loss_weights(torch.tensor(batch["per_sample_loss"], dtype=dtype), strategy, 1.0, 0.4)
            assert torch.equal(w, torch.ones_like(w))
