"""Token-level weighting inside the loss: TLDR (`token-loss`) and PRIOR (`token-reference`).

TLDR: Jiang, Wolf, Monz, de Rijke 2020, "TLDR: Token Loss Dynamic Reweighting for Reducing
Repetitive Utterance Generation", arXiv:2003.11963; reference code ShaojieJiang/tldr @ c878ed1,
parlai/core/torch_generator_agent.py (`compute_loss` and `loss_weight`, weight_func "ldr",
weight_level "token"). Each token's weight is a function of its own probability p_t = exp(-l_t),
l_t its loss (the reference takes p_t from the softmax of the same forward), larger for hard
tokens (the paper's cosine weighting function, as the reference computes it):

    w_t = cos(pi p_t) + 1 = cos(pi exp(-l_t)) + 1     in [0, 2]; 0 when p = 1, 2 as p -> 0

and the reference's loss is sum_t w_t l_t / (number of target tokens): no clipping, no
temperature, no rescaling of w.

PRIOR: Chen, Peng, Zhang, Ji 2025, "Prioritizing Image-Related Tokens Enhances Vision-Language
Pre-Training", arXiv:2505.08971. What is cited here is the paper's abstract: a frozen, text-only
reference model's probability p_ref of each caption token gives its weight in the next-token
loss ("a token-specific re-weighting term based on the importance scores"), and tokens the
reference finds hard (low p_ref) get more weight. The weight function used here is

    w_t = (1 - p_ref(x_t))^alpha       alpha >= 0; alpha = 0 is plain next-token prediction

(TLDR's reference code offers the same form, weight_func "fl", on the model's own p). Ours, not
the paper's: this functional form, alpha's range [0, 16] and default 1, and the rescaling below;
the paper's own equation for the weight, and whatever normalisation or clipping it applies, are
not reproduced here, and the authors' repository (Yangyi-Chen/PRIOR) publishes no code to
check against.

p_ref = exp(-reference token loss) comes from the reference forward DoReMi's probe already runs
(mixer.megatron.probes.ExcessLossProbe.reference_token_loss); no second model is loaded.

Choices that are ours:

- Detached weights. TLDR's weights are differentiable (the reference back-propagates through
  cos(pi p) + 1); here w is a constant of the step (no gradient through the weight), as every
  other weighting in this package. PRIOR's reference weights carry no gradient in either case.
- Normalisation. The TLDR reference divides the weighted sum by the token count without
  rescaling the weights (its loss shrinks as tokens get easy). Here both raw weights are
  rescaled so that over the loss-bearing tokens of the micro-batch, all-reduced over the
  data-parallel group, sum_t w_t = N (the unweighted token count): w_t <- w_t N / sum_t w_t.
  The loss stays the weighted token-loss sum over the unweighted global token count
  (mixer.megatron.loss.compute_loss), so its scale matches plain training.
  When every raw weight is 0 (all tokens certain) the weights fall back to 1.
- `burn_in`: uniform weights (all 1) for the first steps; 0 by default (the papers start at once).

No host sync: nothing here calls .item() or .cpu(); the all-reduce of two numbers stays on the
device. The float64 numpy functions at the end re-derive the same weights for tests and replay.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mixer.weighting.params import TokenLossParams, TokenReferenceParams

__all__ = [
    "METHODS",
    "domain_mean_weight",
    "normalise",
    "prior_raw",
    "report_extra",
    "tldr_raw",
    "token_weights",
    "token_weights_np",
]

METHODS = ("token-loss", "token-reference")


def _check(name: str, t: Tensor, mask: Tensor) -> None:
    if t.dim() != 2 or t.shape != mask.shape:
        raise ValueError(f"{name} {tuple(t.shape)} and loss mask {tuple(mask.shape)} must both be [b, s]")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {t.dtype}")


def tldr_raw(token_loss: Tensor) -> Tensor:
    """TLDR's w_t = cos(pi exp(-l_t)) + 1 (float32 at least, detached)."""
    l = token_loss.detach().to(torch.promote_types(token_loss.dtype, torch.float32))
    return torch.cos(math.pi * torch.exp(-l)) + 1.0


def prior_raw(reference_token_loss: Tensor, alpha: float) -> Tensor:
    """PRIOR's w_t = (1 - p_ref)^alpha with p_ref = exp(-reference token loss), detached."""
    l = reference_token_loss.detach().to(torch.promote_types(reference_token_loss.dtype, torch.float32))
    # 1 - exp(-l) = -expm1(-l): accurate when p_ref is close to 1. Clamp: a slightly negative
    # reference loss (rounding) must not give a NaN power.
    return torch.pow((-torch.expm1(-l)).clamp(min=0.0), alpha)


def normalise(raw: Tensor, mask: Tensor, group: Any = None) -> Tensor:
    """raw * N / sum(raw) over the masked tokens, both sums all-reduced over `group`; 0 off the
    mask; all ones on the mask when the raw weights sum to 0."""
    m = mask.to(raw.dtype)
    w = raw * m
    sums = torch.stack([w.sum(), m.sum()]).to(torch.float64)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(sums, group=group)
    total, count = sums[0], sums[1]
    scale = torch.where(total > 0, count / total.clamp(min=1e-300), torch.zeros_like(total)).to(raw.dtype)
    return torch.where(total > 0, w * scale, m)


def token_weights(
    method: str,
    params: TokenLossParams | TokenReferenceParams,
    step: int,
    token_loss: Tensor,
    mask: Tensor,
    reference_token_loss: Tensor | None = None,
    *,
    group: Any = None,
) -> Tensor:
    """[b, s] detached token weights of `method` for training step `step` (mask zeros stay 0)."""
    _check("token loss", token_loss, mask)
    if method == "token-loss":
        raw = tldr_raw(token_loss)
    elif method == "token-reference":
        if reference_token_loss is None:
            raise ValueError(
                "token-reference weighting needs the reference model's per-token loss "
                "(probes.ExcessLossProbe.reference_token_loss); got None"
            )
        _check("reference token loss", reference_token_loss, mask)
        raw = prior_raw(reference_token_loss, params.alpha)  # type: ignore[union-attr]
    else:
        raise ValueError(f"unknown token weighting {method!r}; use one of {', '.join(METHODS)}")
    with torch.no_grad():
        if step < params.burn_in:
            return mask.to(raw.dtype)
        return normalise(raw, mask, group)


def domain_mean_weight(weights: Tensor, mask: Tensor, domain: Tensor, num_domains: int) -> Tensor:
    """[2K] float32 on the device: per domain, the sum of token weights then the token count
    (mean weight = sum / count; summable over micro-batches and ranks before dividing)."""
    with torch.no_grad():
        m = mask.to(torch.float32)
        d = domain.to(device=weights.device, dtype=torch.int64).reshape(-1)
        wsum = torch.zeros(num_domains, device=weights.device).index_add_(0, d, (weights.float() * m).sum(1))
        cnt = torch.zeros(num_domains, device=weights.device).index_add_(0, d, m.sum(1))
        return torch.cat([wsum, cnt])


# float64 numpy reference of the same formulas (tests, replay).


def token_weights_np(
    method: str,
    token_loss: np.ndarray,
    mask: np.ndarray,
    reference_token_loss: np.ndarray | None = None,
    alpha: float = 1.0,
) -> np.ndarray:
    """float64 weights over the whole (global) batch: the paper's raw weight rescaled to sum to
    the masked token count."""
    m = np.asarray(mask, dtype=np.float64)
    if method == "token-loss":
        raw = np.cos(np.pi * np.exp(-np.asarray(token_loss, dtype=np.float64))) + 1.0
    elif method == "token-reference":
        p = np.exp(-np.asarray(reference_token_loss, dtype=np.float64))
        raw = np.clip(1.0 - p, 0.0, None) ** alpha
    else:
        raise ValueError(f"unknown token weighting {method!r}; use one of {', '.join(METHODS)}")
    w = raw * m
    total = w.sum()
    return m.copy() if total <= 0 else w * (m.sum() / total)


REPORT_EXTRA_PREFIX = "token_weight_mean."
"""Report `extra` keys: token_weight_mean.<domain index> = a domain's mean token weight."""


def report_extra(domain_weight: np.ndarray, num_domains: int, limit: int = 48) -> dict[str, float]:
    """Report `extra` entries (mixer.signals, at most 64 finite scalars) from `domain_mean_weight`
    summed over the step: the mean token weight of each domain that had tokens, for the first
    `limit` domains (the rest are left out to keep room for other extras)."""
    a = np.asarray(domain_weight, dtype=np.float64).reshape(-1)
    if a.size != 2 * num_domains:
        raise ValueError(f"domain token weights: need {2 * num_domains} numbers (sums, counts), got {a.size}")
    wsum, cnt = a[:num_domains], a[num_domains:]
    return {
        f"{REPORT_EXTRA_PREFIX}{d}": float(wsum[d] / cnt[d])
        for d in range(min(num_domains, limit))
        if cnt[d] > 0 and np.isfinite(wsum[d] / cnt[d])
    }
