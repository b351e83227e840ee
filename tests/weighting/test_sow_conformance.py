"""Loss-based reweighting against the Sow et al. reference vectors (tests/conformance, or the folder
$MIXER_CONFORMANCE_DIR names).

Everything comes from the file: its batches (read at collection; one test case per batch, strategy
and r), the strategies and r values run, delta, the burn-in length and the tolerances. Batches are
chosen by their data (all losses equal, losses close together), never by their names.
"""

from __future__ import annotations

import re

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
from tests.conformance_dir import load_vectors, tolerance

FILE = "sow_loss_reweighting"

# float32 runs: the file's note gives ~1e-6 relative; 1e-5 leaves room. Where h cancels (losses far
# larger than their spread), the note's float32 rtol applies instead.
FLOAT32_RTOL = 1e-5
FLOAT32_ATOL_WEIGHTS = 1e-7
FLOAT32_ATOL_LOSS = 1e-6
# max |l| / (l_max - l_min) above which a batch counts as cancellation-prone: the float32 error of
# h grows with this ratio (~4e-7 times it here), so up to 10 stays within FLOAT32_RTOL.
CANCELLATION_RATIO = 10.0


@pytest.fixture(scope="module")
def vectors() -> dict:
    return load_vectors(FILE)


def _batch(vectors: dict, name: str) -> dict:
    (batch,) = [b for b in vectors["inputs"]["batches"] if b["name"] == name]
    return batch


def _batch_names(select=None) -> list[str]:
    """The file's batches in file order (read when pytest collects); `select(losses)` filters by data."""
    batches = load_vectors(FILE)["inputs"]["batches"]
    return [b["name"] for b in batches if select is None or select(np.asarray(b["per_sample_loss"]))]


def _cases() -> list:
    """(batch, strategy, r) for every entry of `expected[batch].by_strategy[strategy][r]`."""
    data = load_vectors(FILE)
    return [
        pytest.param(name, strategy, r, id=f"{name}-{strategy}-r{r}")
        for name in _batch_names()
        for strategy, by_r in data["expected"][name]["by_strategy"].items()
        for r in by_r
    ]


def _all_equal(losses: np.ndarray) -> bool:
    return bool((losses == losses[0]).all())


def _cancellation_prone(losses: np.ndarray) -> bool:
    spread = float(losses.max() - losses.min())
    return spread > 0 and float(np.abs(losses).max()) / spread > CANCELLATION_RATIO


def _float32_loose_rtol(vectors: dict) -> float:
    """The note's 'use rtol X for float32' (for cancellation-prone batches); FLOAT32_RTOL if absent."""
    m = re.search(
        r"rtol\s+(\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)\s+for\s+float32", str(vectors["tolerance"].get("note", ""))
    )
    return max(FLOAT32_RTOL, float(m[1])) if m else FLOAT32_RTOL


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


def test_file_covers_every_batch_strategy_and_r(vectors: dict) -> None:
    hp = vectors["hyperparameters"]
    names = _batch_names()
    assert names and len(names) == len(set(names))
    assert sorted(vectors["expected"]) == sorted(names)
    strategies, rs = hp["strategies run"], hp["kl_reg (r) values run"]
    for name in names:
        by_strategy = vectors["expected"][name]["by_strategy"]
        assert sorted(by_strategy) == sorted(strategies), name
        for strategy, by_r in by_strategy.items():
            assert sorted(float(r) for r in by_r) == sorted(float(r) for r in rs), f"{name}/{strategy}"
        batch = _batch(vectors, name)
        assert len(batch["per_sample_loss"]) == len(batch["num_active_tokens"]) == hp["batch"], name
    assert len(_cases()) == len(names) * len(strategies) * len(rs)


@pytest.mark.parametrize(("name", "strategy", "r"), _cases())
def test_numpy_reference_matches_h_f_weights_and_loss(
    vectors: dict, name: str, strategy: str, r: str
) -> None:
    tol = tolerance(vectors)
    delta = vectors["hyperparameters"]["delta"]
    expected = vectors["expected"][name]["by_strategy"][strategy][r]
    batch = _batch(vectors, name)
    where = f"{name}/{strategy}/r={r}"
    losses = np.array(batch["per_sample_loss"])
    tokens = np.array(batch["num_active_tokens"])
    h = normalise_np(losses, delta)
    close(h, expected["normalized_loss_h"], tol, f"{where} h")
    close(strategy_value_np(h, strategy, delta), expected["strategy_value_f"], tol, f"{where} f")
    w = loss_weights_np(losses, strategy, delta, float(r))
    assert w.sum() == pytest.approx(len(losses), rel=1e-12), where
    # The file's weights sum to 1 over the batch; ours sum to the batch size.
    close(w / len(losses), expected["weights"], tol, f"{where} weights")
    loss = reweighted_loss(torch.tensor(losses), torch.tensor(tokens), torch.tensor(w))
    close(loss.item(), expected["final_scalar_loss"], tol, f"{where} loss")


@pytest.mark.parametrize(("name", "strategy", "r"), _cases())
def test_torch_float64_matches_at_file_tolerance(vectors: dict, name: str, strategy: str, r: str) -> None:
    tol = tolerance(vectors)
    delta = vectors["hyperparameters"]["delta"]
    expected = vectors["expected"][name]["by_strategy"][strategy][r]
    batch = _batch(vectors, name)
    where = f"{name}/{strategy}/r={r}"
    losses = torch.tensor(batch["per_sample_loss"], dtype=torch.float64)
    tokens = torch.tensor(batch["num_active_tokens"])
    w = loss_weights(losses, strategy, delta, float(r))
    assert w.dtype == torch.float64
    close(w.numpy() / len(losses), expected["weights"], tol, where)
    close(reweighted_loss(losses, tokens, w).item(), expected["final_scalar_loss"], tol, where)


@pytest.mark.parametrize(("name", "strategy", "r"), _cases())
def test_torch_float32_matches_at_float32_tolerance(vectors: dict, name: str, strategy: str, r: str) -> None:
    delta = vectors["hyperparameters"]["delta"]
    expected = vectors["expected"][name]["by_strategy"][strategy][r]
    batch = _batch(vectors, name)
    prone = _cancellation_prone(np.asarray(batch["per_sample_loss"]))
    rtol = _float32_loose_rtol(vectors) if prone else FLOAT32_RTOL
    losses = torch.tensor(batch["per_sample_loss"], dtype=torch.float32)
    tokens = torch.tensor(batch["num_active_tokens"])
    w = loss_weights(losses, strategy, delta, float(r))
    assert w.dtype == torch.float32
    where = f"{name}/{strategy}/r={r}"
    close(
        w.double().numpy() / len(losses), expected["weights"], {}, where, rtol=rtol, atol=FLOAT32_ATOL_WEIGHTS
    )
    close(
        reweighted_loss(losses, tokens, w).item(),
        expected["final_scalar_loss"],
        {},
        where,
        rtol=rtol,
        atol=FLOAT32_ATOL_LOSS,
    )


@pytest.mark.parametrize("name", _batch_names())
def test_burn_in_path_matches_no_reweighting(vectors: dict, name: str) -> None:
    tol = tolerance(vectors)
    hp = vectors["hyperparameters"]
    burn_in = hp["defaults"]["burnout_steps"]
    expected = vectors["expected"][name]["no_reweighting"]
    batch = _batch(vectors, name)
    losses = torch.tensor(batch["per_sample_loss"], dtype=torch.float64)
    tokens = torch.tensor(batch["num_active_tokens"])
    close((tokens.double() / tokens.sum()).numpy(), expected["len_norms"], tol, f"{name} len_norms")
    close(reweighted_loss(losses, tokens).item(), expected["final_scalar_loss"], tol, f"{name} loss")
    for strategy in hp["strategies run"]:
        w = weights_for_step(burn_in - 1, losses, {"method": strategy, "burn_in": burn_in})
        assert torch.equal(w, torch.ones_like(losses)), f"{name}/{strategy}"
        close(
            reweighted_loss(losses, tokens, w).item(),
            expected["final_scalar_loss"],
            tol,
            f"{name}/{strategy}",
        )


@pytest.mark.parametrize("name", _batch_names(_all_equal))
def test_all_equal_batch_gives_uniform_weights(vectors: dict, name: str) -> None:
    hp = vectors["hyperparameters"]
    batch = _batch(vectors, name)
    for strategy in hp["strategies run"]:
        for r in hp["kl_reg (r) values run"]:
            for dtype in (torch.float32, torch.float64):
                losses = torch.tensor(batch["per_sample_loss"], dtype=dtype)
                w = loss_weights(losses, strategy, hp["delta"], float(r))
                assert torch.equal(w, torch.ones_like(w)), f"{name}/{strategy}/r={r}/{dtype}"
