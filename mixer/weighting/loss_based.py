"""Loss-based instance reweighting (Sow, Woisetschlaeger, Bulusu, Wang, Jacobsen, Liang, ICLR 2025,
"Dynamic Loss-Based Sample Reweighting for Improved Large Language Model Pretraining",
arXiv:2502.06733; reference code sowmaster/Sample-Level-Loss-Reweighting-ICLR-2025 @ edd6f15).

Each sample's token-mean loss l_i over the global batch of N samples is mapped linearly onto
[-delta, delta] (the reference's h_func; it floors the range at 1e-6):

    x_i = 2 delta (l_i - (l_max + l_min) / 2) / max(l_max - l_min, 1e-6)

a strategy f scores it (the paper's strategies; the reference's f_func_*):

    LinUpper   f(x) = min(x + delta, delta)    down-weights only the lowest losses
    Quadratic  f(x) = 1 - x^2 / delta^2        favours medium losses (reference name "mid")
    Extremes   f(x) = |x|                      favours both ends
    upper      f(x) = x / 2 + delta / 2        the reference's linear increasing one (unused there)
    uniform    f(x) = 0

and the paper's KL-regularised weight problem has a softmax with temperature r as its solution
(the reference's g_func and weight block):

    w_i = N softmax(f(x) / r)_i               (sum_i w_i = N)

The training loss is then sum_i w_i (n_i / sum_j n_j) l_i over the rank's samples, with n_i the
sample's loss-bearing tokens (the reference's token-count weighting; see `reweighted_loss`).
Weights are uniform for the first `burn_in` steps (the reference's burnout_steps = 1000).

Min, max and the softmax run over the all-gathered global batch when torch.distributed is up
with more than one rank; each rank keeps its slice, as in the reference. Weights never carry
autograd history: they are constants of the step, as in the reference's `torch.no_grad()` block.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mixer.weighting.distributed import gather_batch
from mixer.weighting.params import LOSS_ALIASES, LOSS_METHODS, LossParams

RANGE_FLOOR = 1e-6


def _method(method: str) -> str:
    name = LOSS_ALIASES.get(method, method)
    if name not in LOSS_METHODS:
        raise ValueError(
            f"unknown loss-reweighting method {method!r}; use one of {', '.join(LOSS_METHODS)} (or 'mid')"
        )
    return name


def _check_args(delta: float, r: float) -> None:
    if not (np.isfinite(delta) and delta > 0):
        raise ValueError(f"delta must be a finite number > 0, got {delta!r}")
    if not (np.isfinite(r) and r > 0):
        raise ValueError(f"r (the softmax temperature) must be a finite number > 0, got {r!r}")


def _check_losses(losses: torch.Tensor) -> None:
    if losses.ndim != 1:
        raise ValueError(f"losses must be a 1-D tensor of per-sample losses, got shape {tuple(losses.shape)}")
    if losses.numel() == 0:
        raise ValueError("losses is empty; loss reweighting needs at least one sample")
    if not losses.is_floating_point():
        raise ValueError(f"losses must be floating point, got {losses.dtype}")


def _check_finite(losses: torch.Tensor) -> None:
    # One host sync per step; a NaN weight would silently poison every parameter update.
    if not bool(torch.isfinite(losses).all()):
        bad = torch.nonzero(~torch.isfinite(losses))[0].item()
        raise ValueError(
            f"losses contains a non-finite value ({losses[bad].item()}) at global sample index {bad}; "
            "per-sample losses must be finite before they are reweighted"
        )


def normalise(losses: torch.Tensor, delta: float = 1.0) -> torch.Tensor:
    """x_i: losses mapped linearly from [l_min, l_max] onto [-delta, delta] (range floored at 1e-6)."""
    lo, hi = losses.min(), losses.max()
    # Centring before scaling keeps float32 accurate when the losses sit close together.
    return (2.0 * delta) * (losses - (hi + lo) / 2) / torch.clamp(hi - lo, min=RANGE_FLOOR)


def strategy_value(x: torch.Tensor, method: str, delta: float = 1.0) -> torch.Tensor:
    """f(x) of Sow et al.'s strategy `method`."""
    match _method(method):
        case "linupper":
            return torch.clamp(x + delta, max=delta)
        case "quadratic":
            return 1.0 - x * x / (delta * delta)
        case "extremes":
            return x.abs()
        case "upper":
            return 0.5 * x + 0.5 * delta
        case _:
            return torch.zeros_like(x)


def loss_weights(
    losses: torch.Tensor, method: str = "linupper", delta: float = 1.0, r: float = 1.0, *, group: Any = None
) -> torch.Tensor:
    """This rank's instance weights: detached, at least float32, summing to the global batch size.

    `losses` are this rank's per-sample token-mean losses (1-D). Raises ValueError on NaN/Inf.
    """
    _check_args(delta, r)
    _check_losses(losses)
    with torch.no_grad():
        local = losses.detach().to(torch.promote_types(losses.dtype, torch.float32))
        full, start = gather_batch(local, group)
        # Checked after the gather so every rank sees the same batch and raises together.
        _check_finite(full)
        f = strategy_value(normalise(full, delta), method, delta)
        w = torch.softmax(f / r, dim=0) * full.numel()
        return w[start : start + local.numel()]


def reweighted_loss(
    losses: torch.Tensor, num_tokens: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """The scalar the reference back-propagates: sum_i w_i (n_i / sum_j n_j) l_i over this rank.

    With weights summing to the global batch size this equals the reference's
    sum_i w_i (n_i / sum n) l_i * world_size * local_batch; weights None is the burn-in path.
    """
    share = num_tokens.to(losses.dtype) / num_tokens.sum().to(losses.dtype)
    if weights is None:
        return (share * losses).sum()
    return (weights.detach().to(losses.dtype) * share * losses).sum()


def weights_for_step(
    step: int, losses: torch.Tensor, params: LossParams | dict[str, Any], *, group: Any = None
) -> torch.Tensor:
    """Weights for training step `step`: uniform (ones) during burn-in, `loss_weights` after."""
    p = params if isinstance(params, LossParams) else LossParams.parse(params)
    if step < p.burn_in:
        _check_losses(losses)
        _check_finite(losses.detach())
        return torch.ones(
            losses.shape, dtype=torch.promote_types(losses.dtype, torch.float32), device=losses.device
        )
    return loss_weights(losses, p.method, p.delta, p.r, group=group)


# float64 numpy reference: the same formulas, used by tests and offline replay.


def normalise_np(losses: np.ndarray, delta: float = 1.0) -> np.ndarray:
    l = np.asarray(losses, dtype=np.float64)
    lo, hi = l.min(), l.max()
    return 2.0 * delta * (l - (hi + lo) / 2) / max(hi - lo, RANGE_FLOOR)


def strategy_value_np(x: np.ndarray, method: str, delta: float = 1.0) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    match _method(method):
        case "linupper":
            return np.minimum(x + delta, delta)
        case "quadratic":
            return 1.0 - x * x / (delta * delta)
        case "extremes":
            return np.abs(x)
        case "upper":
            return 0.5 * x + 0.5 * delta
        case _:
            return np.zeros_like(x)


def loss_weights_np(
    losses: np.ndarray, method: str = "linupper", delta: float = 1.0, r: float = 1.0
) -> np.ndarray:
    """float64 reference of `loss_weights` for the whole (global) batch; sums to its size."""
    _check_args(delta, r)
    l = np.asarray(losses, dtype=np.float64)
    if l.ndim != 1 or l.size == 0:
        raise ValueError(f"losses must be a non-empty 1-D array, got shape {l.shape}")
    if not np.isfinite(l).all():
        bad = int(np.flatnonzero(~np.isfinite(l))[0])
        raise ValueError(
            f"losses contains a non-finite value ({l[bad]}) at sample index {bad}; losses must be finite"
        )
    f = strategy_value_np(normalise_np(l, delta), method, delta) / r
    g = np.exp(f - f.max())
    return g / g.sum() * l.size
