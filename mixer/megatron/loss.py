"""The training loss plus per-domain and per-sample statistics, reduced on the device.

Nothing here calls .item() or .cpu() on the critical path: StepStats stays on the device, and
AsyncHostCopy moves it to (pinned) host memory without blocking, to be read a step later.

Per-domain loss weights: a version may carry params["domain_loss_weights"] (c_1..c_K; DoReMi's
paper mode ships alpha_i / q_i, mixer.strategies.doremi). Sample b of domain d_b then enters the
loss with weight c_{d_b} (times its instance weight), over the same unweighted token count:
loss = sum_b c_{d_b} w_b S_b / N. Both trainers apply them through `sample_loss_weights` (the plain
loop through compute_loss, the Megatron-LM plug-in through instance.InstanceWeighting and
reporting.LossReporter); the statistics stay unweighted.

Per-token weights (mixer.weighting.token: TLDR `token-loss`, PRIOR `token-reference`) enter as
compute_loss(token_weights=...): S_b becomes sum_t v_t m_t l_t, with the v_t summing to the
unweighted token count, over the same N.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DOMAIN_LOSS_WEIGHTS",
    "MAX_DOMAIN_LOSS_WEIGHT",
    "AsyncHostCopy",
    "HostStats",
    "LossHook",
    "StepStats",
    "compute_loss",
    "gather_samples",
    "parse_domain_loss_weights",
    "reduce_step_stats",
    "sample_loss_weights",
]

DOMAIN_LOSS_WEIGHTS = "domain_loss_weights"
"""The version parameter holding per-domain loss weights."""
MAX_DOMAIN_LOSS_WEIGHT = 1e6
"""Per-domain loss weights lie in [0, 1e6] (DoReMi's paper mode: alpha_i / q_i with q_i >= 1e-6)."""


def parse_domain_loss_weights(params: Any, num_domains: int) -> np.ndarray | None:
    """The version's per-domain loss weights (float64 [K]), None when it carries none; ValueError
    naming the entry when they are not K numbers in [0, MAX_DOMAIN_LOSS_WEIGHT]."""
    raw = params.get(DOMAIN_LOSS_WEIGHTS) if isinstance(params, dict) else None
    if raw is None:
        return None
    if not isinstance(raw, (list, tuple)) or len(raw) != num_domains:
        got = f"{len(raw)} entries" if isinstance(raw, (list, tuple)) else repr(raw)[:80]
        raise ValueError(
            f"version params {DOMAIN_LOSS_WEIGHTS}: need a list of {num_domains} numbers, got {got}"
        )
    for i, v in enumerate(raw):
        ok = not isinstance(v, bool) and isinstance(v, (int, float)) and 0.0 <= v <= MAX_DOMAIN_LOSS_WEIGHT
        if not ok:  # NaN fails the comparison too
            raise ValueError(
                f"version params {DOMAIN_LOSS_WEIGHTS}[{i}] = {v!r}; must lie in [0, {MAX_DOMAIN_LOSS_WEIGHT:g}]"
            )
    return np.asarray(raw, dtype=np.float64)


def sample_loss_weights(
    domain: Tensor, domain_loss_weights: Tensor, instance_weights: Tensor | None = None
) -> Tensor:
    """Detached per-sample weights c_{d_b} (times the instance weights w_b when given)."""
    c = domain_loss_weights.detach().to(device=domain.device)
    per_sample = c[domain.to(torch.int64).reshape(-1)]
    if instance_weights is None:
        return per_sample
    return per_sample * instance_weights.detach().to(device=domain.device, dtype=per_sample.dtype).reshape(-1)


@dataclass
class StepStats:
    """Detached statistics of one step's batch, on the device."""

    loss: Tensor  # [] the training loss that was optimised (detached)
    sample_loss: Tensor  # [b] float32: token-mean loss of each sample (unweighted)
    sample_domain: Tensor  # [b] int32: domain index of each sample
    sample_id: Tensor  # [b] int64: global sample ids (-1 when unknown)
    domain_loss_sum: Tensor  # [K] float32: sum of token losses per domain
    domain_token_count: Tensor  # [K] float32: loss-mask tokens per domain
    domain_sample_count: Tensor  # [K] int64: samples per domain


@dataclass
class HostStats:
    """StepStats as numpy arrays on the host, tagged with the step they belong to."""

    step: int
    loss: float
    sample_loss: np.ndarray  # float32 [b]
    sample_domain: np.ndarray  # int32 [b]
    sample_id: np.ndarray  # int64 [b]
    domain_loss_sum: np.ndarray  # float64 [K]
    domain_token_count: np.ndarray  # float64 [K]
    domain_sample_count: np.ndarray  # int64 [K]
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    """Probe results and instance weights that rode along with this step (see AsyncHostCopy.push)."""

    def report_to(self, attachment: Any, version: int, **signals: Any) -> None:
        """Hand this step's statistics to an attachment (train.Attachment.report), with further Report fields."""
        attachment.report(
            step=self.step,
            applied_version=version,
            domain_loss_sum=self.domain_loss_sum,
            domain_token_count=self.domain_token_count,
            domain_sample_count=self.domain_sample_count,
            sample_loss=self.sample_loss,
            sample_domain=self.sample_domain,
            sample_id=self.sample_id,
            **signals,
        )

    def domain_mean_loss(self) -> np.ndarray:
        """Token-mean loss per domain (NaN where the domain had no tokens)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(
                self.domain_token_count > 0, self.domain_loss_sum / self.domain_token_count, np.nan
            )


def compute_loss(
    per_token_loss: Tensor,
    loss_mask: Tensor,
    dataset_id: Tensor,
    num_domains: int,
    *,
    instance_weights: Tensor | None = None,
    sample_id: Tensor | None = None,
    normalizer: Tensor | None = None,
    domain_loss_weights: Tensor | None = None,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, StepStats]:
    """Scalar loss to optimise and the step's unweighted StepStats.

    token_weights: [b, s] detached per-token weights (mixer.weighting.token: TLDR, PRIOR) that
    multiply each token's loss inside S_b; normalised there so that they sum to the unweighted
    token count, and N below stays that unweighted count.

    loss = sum_b c_{d_b} w_b S_b / N (S_b: masked loss sum of sample b, w_b its instance weight,
    c_{d_b} its domain's loss weight, each 1 when not given). N is the unweighted token count, as
    in the Sow et al. reference (the weighted loss sum over the global token count): this batch's
    by default; under data parallelism pass `normalizer` = the global batch's token count / the
    number of ranks, so that the ranks' averaged gradients are the gradient of the global loss,
    whatever the data-parallel size.
    """
    if per_token_loss.dim() != 2 or per_token_loss.shape != loss_mask.shape:
        raise ValueError(
            f"per-token loss {tuple(per_token_loss.shape)} and mask {tuple(loss_mask.shape)} must be [b, s]"
        )
    device = per_token_loss.device
    if domain_loss_weights is not None:
        if domain_loss_weights.numel() != num_domains:
            raise ValueError(f"{domain_loss_weights.numel()} domain loss weights for {num_domains} domains")
        instance_weights = sample_loss_weights(dataset_id.to(device), domain_loss_weights, instance_weights)
    mask = loss_mask.to(per_token_loss.dtype)
    sample_sum = (per_token_loss * mask).sum(dim=1)  # [b], carries the graph
    sample_tokens = mask.sum(dim=1)  # [b]
    loss = _weighted_loss(
        per_token_loss, mask, sample_sum, sample_tokens, instance_weights, normalizer, token_weights
    )
    stats = _step_stats(loss, sample_sum, sample_tokens, dataset_id, num_domains, sample_id)
    return loss, stats


def _weighted_loss(
    per_token_loss: Tensor,
    mask: Tensor,
    sample_sum: Tensor,
    sample_tokens: Tensor,
    instance_weights: Tensor | None,
    normalizer: Tensor | None,
    token_weights: Tensor | None,
) -> Tensor:
    """sum_b w_b S_b / N, S_b token-weighted when token weights are given (see compute_loss)."""
    batch = per_token_loss.shape[0]
    device = per_token_loss.device
    if token_weights is not None:
        if token_weights.shape != per_token_loss.shape:
            raise ValueError(
                f"token weights {tuple(token_weights.shape)} must match the per-token loss "
                f"{tuple(per_token_loss.shape)}"
            )
        tw = token_weights.detach().to(device=device, dtype=per_token_loss.dtype)
        train_sum = (per_token_loss * mask * tw).sum(dim=1)  # the statistics stay unweighted
    else:
        train_sum = sample_sum
    tokens = sample_tokens.sum() if normalizer is None else normalizer.to(device=device, dtype=mask.dtype)
    if instance_weights is None:
        loss = train_sum.sum() / tokens.clamp(min=1)
    else:
        w = instance_weights.detach().to(device=device, dtype=per_token_loss.dtype).reshape(batch)
        loss = (w * train_sum).sum() / tokens.clamp(min=1)
    return loss


@torch.no_grad()
def _step_stats(
    loss: Tensor,
    sample_sum: Tensor,
    sample_tokens: Tensor,
    dataset_id: Tensor,
    num_domains: int,
    sample_id: Tensor | None,
) -> StepStats:
    """The step's unweighted statistics (detached)."""
    batch = sample_sum.shape[0]
    device = sample_sum.device
    domain = dataset_id.to(device=device, dtype=torch.int64).reshape(batch)
    sums = sample_sum.detach().float()
    tokens = sample_tokens.detach().float()
    # index_add_ rather than bincount: bincount on CUDA synchronises to size its output.
    loss_sum = torch.zeros(num_domains, device=device, dtype=torch.float32).index_add_(0, domain, sums)
    token_count = torch.zeros(num_domains, device=device, dtype=torch.float32).index_add_(0, domain, tokens)
    sample_count = torch.zeros(num_domains, device=device, dtype=torch.int64).index_add_(
        0, domain, torch.ones_like(domain)
    )
    if sample_id is None:
        ids = torch.full((batch,), -1, device=device, dtype=torch.int64)
    else:
        ids = sample_id.to(device=device, dtype=torch.int64).reshape(batch)
    return StepStats(
        loss=loss.detach().float(),
        sample_loss=sums / tokens.clamp(min=1),
        sample_domain=domain.to(torch.int32),
        sample_id=ids,
        domain_loss_sum=loss_sum,
        domain_token_count=token_count,
        domain_sample_count=sample_count,
    )


def reduce_step_stats(stats: StepStats, group=None) -> StepStats:
    """Sum per-domain statistics and gather per-sample ones over the data-parallel group."""
    # A no-op unless more than one rank. Per-domain sums travel in one float64 all-reduce (sample
    # counts stay exact); per-sample arrays are all-gathered in rank order, so every rank ends up
    # with the whole global batch; the loss becomes the mean over ranks (what DP optimises).
    dist = torch.distributed
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) <= 1:
        return stats
    world = dist.get_world_size(group)
    k = stats.domain_loss_sum.numel()
    packed = torch.cat(
        [
            stats.domain_loss_sum.double(),
            stats.domain_token_count.double(),
            stats.domain_sample_count.double(),
            stats.loss.double().reshape(1),
        ]
    )
    dist.all_reduce(packed, group=group)

    def gather(t: Tensor) -> Tensor:
        out = torch.empty((world * t.numel(),), dtype=t.dtype, device=t.device)
        dist.all_gather_into_tensor(out, t.contiguous(), group=group)
        return out

    return StepStats(
        loss=(packed[3 * k] / world).float(),
        sample_loss=gather(stats.sample_loss),
        sample_domain=gather(stats.sample_domain),
        sample_id=gather(stats.sample_id),
        domain_loss_sum=packed[:k].float(),
        domain_token_count=packed[k : 2 * k].float(),
        domain_sample_count=packed[2 * k : 3 * k].round().to(torch.int64),
    )


def gather_samples(t: Tensor, group=None) -> Tensor:
    """A per-sample tensor all-gathered over the data-parallel group in rank order (as reduce_step_stats)."""
    dist = torch.distributed
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) <= 1:
        return t
    out = torch.empty((dist.get_world_size(group) * t.numel(),), dtype=t.dtype, device=t.device)
    dist.all_gather_into_tensor(out, t.contiguous().reshape(-1), group=group)
    return out


class LossHook:
    """compute_loss bound to K domains, with the data-parallel reduction of the statistics."""

    def __init__(self, num_domains: int, group=None, reduce: bool = True) -> None:
        self.num_domains = num_domains
        self.group = group
        self.reduce = reduce

    def __call__(
        self,
        per_token_loss: Tensor,
        loss_mask: Tensor,
        dataset_id: Tensor,
        sample_id: Tensor | None = None,
        instance_weights: Tensor | None = None,
        normalizer: Tensor | None = None,
        token_weights: Tensor | None = None,
    ) -> tuple[Tensor, StepStats]:
        """Loss to backpropagate and the (reduced) statistics of the step."""
        loss, stats = compute_loss(
            per_token_loss,
            loss_mask,
            dataset_id,
            self.num_domains,
            instance_weights=instance_weights,
            sample_id=sample_id,
            normalizer=normalizer,
            token_weights=token_weights,
        )
        if self.reduce:
            stats = reduce_step_stats(stats, self.group)
        return loss, stats


class AsyncHostCopy:
    """Copy StepStats to host memory without blocking; read each step's copy one step later."""

    # Two host buffers alternate: push(step, stats) starts copying into one and returns the
    # finished copy of the previous push from the other. On CUDA the buffers are pinned and the
    # copy is non_blocking behind a CUDA event; on the CPU it is a plain clone. Optional extras
    # (probe results: a few numbers per domain or per sample) travel the same way.

    def __init__(self) -> None:
        self._buffers: list[dict[str, Tensor] | None] = [None, None]
        self._events: list[object | None] = [None, None]
        self._steps: list[int | None] = [None, None]
        self._slot = 0

    @staticmethod
    def _tensors(stats: StepStats, extras: dict[str, Tensor] | None) -> dict[str, Tensor]:
        out = {f.name: getattr(stats, f.name) for f in fields(StepStats)}
        for name, t in (extras or {}).items():
            out["extra." + name] = t.detach()
        return out

    def _host_buffer(self, slot: int, tensors: dict[str, Tensor], pinned: bool) -> dict[str, Tensor]:
        """(Re)allocate the slot's host tensors when names, shapes or dtypes change."""
        buf = self._buffers[slot]
        if (
            buf is None
            or buf.keys() != tensors.keys()
            or any(buf[k].shape != t.shape or buf[k].dtype != t.dtype for k, t in tensors.items())
        ):
            buf = {k: torch.empty(t.shape, dtype=t.dtype, pin_memory=pinned) for k, t in tensors.items()}
            self._buffers[slot] = buf
        return buf

    def push(self, step: int, stats: StepStats, extras: dict[str, Tensor] | None = None) -> HostStats | None:
        """Start copying step's stats (and extras); return the previous push's stats (or None)."""
        slot = self._slot
        tensors = self._tensors(stats, extras)
        on_cuda = stats.loss.is_cuda
        buf = self._host_buffer(slot, tensors, on_cuda)
        for k, t in tensors.items():
            buf[k].copy_(t, non_blocking=t.is_cuda)
        if on_cuda:
            event = torch.cuda.Event()
            event.record()
            self._events[slot] = event
        else:
            self._events[slot] = None
        self._steps[slot] = step
        self._slot = 1 - slot
        return self._collect(1 - slot)

    def flush(self) -> HostStats | None:
        """Wait for the last push and return it (call at the end of training or at a checkpoint)."""
        return self._collect(1 - self._slot)

    def _collect(self, slot: int) -> HostStats | None:
        """Read a finished slot into numpy (copies, so the slot can be reused), once."""
        step = self._steps[slot]
        if step is None:
            return None
        event = self._events[slot]
        if event is not None:
            event.synchronize()
        buf = self._buffers[slot]
        assert buf is not None
        self._steps[slot] = None
        return HostStats(
            step=step,
            loss=float(buf["loss"]),
            sample_loss=buf["sample_loss"].numpy().astype(np.float32, copy=True),
            sample_domain=buf["sample_domain"].numpy().astype(np.int32, copy=True),
            sample_id=buf["sample_id"].numpy().astype(np.int64, copy=True),
            domain_loss_sum=buf["domain_loss_sum"].numpy().astype(np.float64),
            domain_token_count=buf["domain_token_count"].numpy().astype(np.float64),
            domain_sample_count=buf["domain_sample_count"].numpy().astype(np.int64, copy=True),
            extras={k[6:]: buf[k].numpy().copy() for k in buf if k.startswith("extra.")},
        )
