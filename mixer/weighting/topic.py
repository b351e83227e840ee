"""Topic-based instance weights (ToReMi: Zhu et al. 2025, "ToReMi: Topic-Aware Data Reweighting
for Dynamic Pre-Training Data Selection", arXiv:2504.00695).

ToReMi adjusts each sample's training weight by its topics: the service learns a weight per topic
from the topics' observed losses (domain-level, in the strategy) and ships it as the version
parameter `topic_weights`; the worker turns it into per-sample weights inside the training step.
A sample may carry one topic id or several (a row padded with -1); its raw weight is the mean of
its topics' weights:

    u_i = mean_{t in T_i} topic_weights[t]          (T_i: the sample's topic ids)
    w_i = N u_i / sum_j u_j                         (sum_i w_i = N, the global batch size)

A sample without any topic gets the mean topic weight, i.e. it is neither favoured nor dropped.
Ids at or beyond len(topic_weights) count as no topic: a topic the service has not weighted yet
(the worker saw it before the version that covers it arrived) must not stop training.
A batch whose raw weights are all zero has nothing to tell its samples apart and gets uniform
weights rather than a division by zero. Under torch.distributed the normaliser is summed over
the data-parallel group, so weights mean the same on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mixer.weighting.distributed import sum_over_ranks
from mixer.weighting.params import TopicParams


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


def sample_weights(
    topic_ids: torch.Tensor, topic_weights: torch.Tensor | Sequence[float], *, group: Any = None
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
        valid = (ids >= 0) & (ids < tw.numel())
        per_slot = torch.where(
            valid, tw[ids.clamp(0, tw.numel() - 1)], torch.zeros((), dtype=tw.dtype, device=tw.device)
        )
        count = valid.sum(dim=1)
        u = torch.where(count > 0, per_slot.sum(dim=1) / count.clamp(min=1), tw.mean())
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
    return sample_weights(topic_ids, p.topic_weights, group=group)


def sample_weights_np(topic_ids: np.ndarray, topic_weights: Sequence[float] | np.ndarray) -> np.ndarray:
    """float64 reference of `sample_weights` for the whole batch; sums to its size."""
    ids = np.asarray(topic_ids)
    ids = ids[:, None] if ids.ndim == 1 else ids
    tw = np.asarray(topic_weights, dtype=np.float64)
    if tw.ndim != 1 or tw.size == 0 or not np.isfinite(tw).all() or (tw < 0).any():
        raise ValueError("topic_weights must be a non-empty 1-D list of finite numbers >= 0")
    if ids.shape[0] == 0 or ids.min() < -1:
        raise ValueError("topic ids must be >= 0 with -1 as padding, and the batch must be non-empty")
    valid = (ids >= 0) & (ids < tw.size)
    count = valid.sum(axis=1)
    summed = np.where(valid, tw[np.clip(ids, 0, tw.size - 1)], 0.0).sum(axis=1)
    u = np.where(count > 0, summed / np.maximum(count, 1), tw.mean())
    if u.sum() <= 0:
        return np.ones_like(u)
    return u * (u.size / u.sum())
