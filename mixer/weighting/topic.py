"""Topic-based instance weights (ToReMi: Zhu et al. 2025, "ToReMi: Topic-Aware Data Reweighting
for Dynamic Pre-Training Data Selection", arXiv:2504.00695; the authors' code zxx000728/ToReMi @
ecb763a, train/trainer.py `compute_loss`).

The service learns a weight per topic (mixer.strategies.toremi) and ships it as the version
parameter `topic_weights`; the worker turns it into per-sample loss weights inside the training
step. This is where the topic preference is applied, once. A sample carries one topic id or a row
of them padded with -1 (several topics: multi-label, as in the reference). As the reference does:

    s_i = (1 / |T_i|) sum_{t in T_i} topic_weights[t]     (T_i: the sample's topic labels)
    s_i = 0 when the sample has no label                  (it drops out of the loss)

The reference back-propagates mean_i(s_i l_i) (`normalize: false` reproduces it), so the loss
scale follows the mean weight (up to w_max = 5x). Ours, the default (`normalize: true`): the
weights are rescaled to sum to the global batch size, w_i = N s_i / sum_j s_j, so the preference
shifts gradient between samples without changing the learning rate, and the weighted gradient is
the same at any data-parallel size (the sum runs over the data-parallel group). A batch whose
weights are all zero then gets uniform weights rather than a division by zero.

Ours: ids at or beyond len(topic_weights) take weight 1, the weight every topic starts with (the
worker saw a topic before the version that covers it arrived; training must go on).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mixer.weighting.distributed import sum_over_ranks
from mixer.weighting.params import TopicParams

INITIAL_WEIGHT = 1.0
"""The weight of a topic the service has not adjusted yet (every topic starts at 1)."""


def _as_rows(ids: torch.Tensor) -> torch.Tensor:
    if ids.ndim == 1:
        return ids.unsqueeze(1)
    if ids.ndim != 2:
        raise ValueError(
            f"topic_ids must have shape (batch,) or (batch, topics) padded with -1, got {tuple(ids.shape)}"
        )
    return ids


def _check_topic_weights(tw: torch.Tensor) -> None:
    if tw.ndim != 1 or tw.numel() == 0:
        raise ValueError(f"topic_weights must be a non-empty 1-D list, got shape {tuple(tw.shape)}")
    if not bool((torch.isfinite(tw) & (tw >= 0)).all()):
        bad = torch.nonzero(~(torch.isfinite(tw) & (tw >= 0)))[0].item()
        raise ValueError(f"topic_weights[{bad}] = {tw[bad].item()}; topic weights must be finite and >= 0")


def raw_weights(ids: torch.Tensor, tw: torch.Tensor) -> torch.Tensor:
    """s_i: the mean weight of each row's labels (ids >= 0), 0 for a row without any."""
    labelled = ids >= 0
    known = labelled & (ids < tw.numel())
    per_slot = torch.where(
        known, tw[ids.clamp(0, tw.numel() - 1)], torch.zeros((), dtype=tw.dtype, device=tw.device)
    )
    per_slot = torch.where(
        labelled & ~known, torch.full((), INITIAL_WEIGHT, dtype=tw.dtype, device=tw.device), per_slot
    )
    count = labelled.sum(dim=1)
    return torch.where(
        count > 0, per_slot.sum(dim=1) / count.clamp(min=1), torch.zeros((), dtype=tw.dtype, device=tw.device)
    )


def sample_weights(
    topic_ids: torch.Tensor,
    topic_weights: torch.Tensor | Sequence[float],
    *,
    normalize: bool = True,
    group: Any = None,
) -> torch.Tensor:
    """Per-sample weights (detached, float32 or wider) from topic ids and the version's topic weights."""
    with torch.no_grad():
        ids = _as_rows(topic_ids.detach())
        if ids.shape[0] == 0:
            raise ValueError("topic_ids is empty; topic weighting needs at least one sample")
        if ids.is_floating_point():
            raise ValueError(f"topic_ids must be integers (-1 pads), got {ids.dtype}")
        tw = torch.as_tensor(topic_weights, device=ids.device)
        tw = tw.to(torch.promote_types(tw.dtype, torch.float32))
        _check_topic_weights(tw)
        u = raw_weights(ids, tw)
        # Bad ids travel in the reduction, so every rank raises together (none waits in a collective).
        invalid = (ids < -1).sum().to(u.dtype)
        local = torch.stack(
            [u.sum(), torch.tensor(float(u.numel()), dtype=u.dtype, device=u.device), invalid]
        )
        total, n, bad = sum_over_ranks(local, group)
        if float(bad) > 0:
            raise ValueError(
                f"{int(bad)} topic id(s) below -1 in the global batch: ids are >= 0, with -1 as padding"
            )
        if not normalize:
            return u
        if float(total) <= 0:
            return torch.ones_like(u)
        return u * (n / total)


def weights_from_params(
    topic_ids: torch.Tensor, params: TopicParams | dict[str, Any], *, group: Any = None
) -> torch.Tensor:
    """Weights from a version's params (`{"topic_weights": [...]}`); uniform while none were shipped."""
    p = params if isinstance(params, TopicParams) else TopicParams.parse(params)
    if not p.topic_weights:
        return torch.ones(topic_ids.shape[0], dtype=torch.float32, device=topic_ids.device)
    return sample_weights(topic_ids, p.topic_weights, normalize=p.normalize, group=group)


def sample_weights_np(
    topic_ids: np.ndarray, topic_weights: Sequence[float] | np.ndarray, *, normalize: bool = True
) -> np.ndarray:
    """float64 reference of `sample_weights` for the whole batch."""
    ids = np.asarray(topic_ids)
    ids = ids[:, None] if ids.ndim == 1 else ids
    tw = np.asarray(topic_weights, dtype=np.float64)
    if tw.ndim != 1 or tw.size == 0 or not np.isfinite(tw).all() or (tw < 0).any():
        raise ValueError("topic_weights must be a non-empty 1-D list of finite numbers >= 0")
    if ids.shape[0] == 0 or ids.min() < -1:
        raise ValueError("topic ids must be >= 0 with -1 as padding, and the batch must be non-empty")
    labelled = ids >= 0
    per_slot = np.where(ids < tw.size, tw[np.clip(ids, 0, tw.size - 1)], INITIAL_WEIGHT)
    count = labelled.sum(axis=1)
    u = np.where(count > 0, np.where(labelled, per_slot, 0.0).sum(axis=1) / np.maximum(count, 1), 0.0)
    if not normalize:
        return u
    if u.sum() <= 0:
        return np.ones_like(u)
    return u * (u.size / u.sum())
