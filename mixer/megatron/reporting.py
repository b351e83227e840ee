"""Per-step statistics on the last pipeline stage: accumulate micro-batches, reduce once, report once.

LossReporter wraps the user's loss_func (see lm.py for the normalisation): per-token losses are
multiplied by the instance weights, and the unweighted per-sample sums, token counts, domains and
sample ids accumulate on the device across micro-batches with no collective and no host sync.
After the step's last micro-batch they are reduced over context (sum) and data-parallel (gather)
ranks, copied to the host asynchronously, and the reporting rank hands the previous step's
statistics to its session.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mixer.megatron.loader import MicroBatchMeta
from mixer.megatron.loss import AsyncHostCopy, HostStats, StepStats, reduce_step_stats
from mixer.megatron.topology import Topology

__all__ = ["LossReporter"]


@dataclass
class _Accumulator:
    """One step's statistics on the device, summed over its micro-batches (no collective)."""

    sums: list[Tensor] = field(default_factory=list)
    tokens: list[Tensor] = field(default_factory=list)
    domains: list[Tensor] = field(default_factory=list)
    ids: list[Tensor] = field(default_factory=list)

    def add(self, sample_sum: Tensor, sample_tokens: Tensor, domain: Tensor, ids: Tensor) -> None:
        self.sums.append(sample_sum)
        self.tokens.append(sample_tokens)
        self.domains.append(domain)
        self.ids.append(ids)

    def finish(self, num_domains: int, topo: Topology) -> StepStats:
        """The step's statistics reduced over context (sum) and data-parallel (gather) ranks."""
        sums, tokens = torch.cat(self.sums), torch.cat(self.tokens)
        domain, ids = torch.cat(self.domains), torch.cat(self.ids)
        self.sums, self.tokens, self.domains, self.ids = [], [], [], []
        if topo.cp_size > 1:
            # Each context-parallel rank holds a slice of every sequence: sum the slices.
            both = torch.stack([sums, tokens])
            torch.distributed.all_reduce(both, group=topo.cp_group)
            sums, tokens = both[0], both[1]
        zeros = torch.zeros(num_domains, device=sums.device, dtype=torch.float32)
        stats = StepStats(
            loss=sums.sum() / tokens.sum().clamp(min=1),
            sample_loss=sums / tokens.clamp(min=1),
            sample_domain=domain.to(torch.int32),
            sample_id=ids,
            domain_loss_sum=zeros.clone().index_add_(0, domain, sums),
            domain_token_count=zeros.clone().index_add_(0, domain, tokens),
            domain_sample_count=torch.zeros(num_domains, device=sums.device, dtype=torch.int64).index_add_(
                0, domain, torch.ones_like(domain)
            ),
        )
        return reduce_step_stats(stats, topo.dp_group)


class LossReporter:
    """Per-step statistics on the last stage: accumulate, reduce once, report from one rank."""

    def __init__(
        self, num_domains: int, topo: Topology, attachment: Any = None, weighting: Any = None
    ) -> None:
        self.num_domains = num_domains
        self.topo = topo
        self.attachment = attachment if topo.reports else None
        self.weighting = weighting
        self.acc = _Accumulator()
        self.host = AsyncHostCopy()
        self.versions: dict[int, int] = {}
        self.reported: list[int] = []  # steps this rank reported (bounded: the last 1024)
        self.keep_records = False  # tests: keep every reported step's arrays in `recorded`
        self.recorded: list[dict[str, Any]] = []
        self.weights_seen: list[list[float]] = []

    def __call__(self, loss_func: Callable[[Tensor], Any], loss_mask: Tensor, meta: MicroBatchMeta | None):
        """The wrapped loss_func for one micro-batch (see the module docstring)."""

        def wrapped(output_tensor: Tensor):
            if meta is None or not meta.train:
                return loss_func(output_tensor)
            mbs = meta.dataset_id.numel()
            per_token = output_tensor.reshape(mbs, -1)
            mask = loss_mask.reshape(mbs, -1).to(per_token.dtype)
            device = per_token.device
            domain = meta.dataset_id.to(device)
            with torch.no_grad():
                sample_sum = (per_token.detach().float() * mask.float()).sum(dim=1)
                sample_tokens = mask.float().sum(dim=1)
            w = self._weights(meta, sample_sum, sample_tokens, domain)
            if w is not None:
                output_tensor = (per_token * w.to(per_token.dtype).reshape(mbs, 1)).reshape(
                    output_tensor.shape
                )
            result = loss_func(output_tensor)
            if self.topo.tp_rank == 0:
                self.acc.add(sample_sum, sample_tokens, domain, meta.sample_id.to(device))
                if meta.index == meta.num_microbatches - 1:
                    self._finish_step(meta)
            return result

        return wrapped

    def _weights(self, meta: MicroBatchMeta, sample_sum: Tensor, sample_tokens: Tensor, domain: Tensor):
        """Detached instance weights of the micro-batch, the same on every tensor-parallel rank."""
        if self.weighting is None or not self.weighting.enabled:
            return None
        topo = self.topo
        w = torch.empty(sample_sum.shape, dtype=torch.float32, device=sample_sum.device)
        if topo.tp_rank == 0:
            sums, tokens = sample_sum, sample_tokens
            if topo.cp_size > 1:
                both = torch.stack([sums, tokens])
                torch.distributed.all_reduce(both, group=topo.cp_group)
                sums, tokens = both[0], both[1]
            self.weighting.sync(meta.version)
            w = self.weighting.weights(meta.step, sums / tokens.clamp(min=1), domain).float()
        if torch.distributed.is_initialized() and torch.distributed.get_world_size(topo.tp_group) > 1:
            torch.distributed.broadcast(w, src=topo.tp_src, group=topo.tp_group)
        if self.keep_records:
            self.weights_seen.append(w.tolist())
        return w

    def _finish_step(self, meta: MicroBatchMeta) -> None:
        stats = self.acc.finish(self.num_domains, self.topo)
        self.versions[meta.step] = meta.version
        self._emit(self.host.push(meta.step, stats))

    def _emit(self, host: HostStats | None) -> None:
        if host is None:
            return
        version = self.versions.pop(host.step)
        if not self.topo.reports:
            return
        self.reported = [*self.reported[-1023:], host.step]
        if self.keep_records:
            self.recorded.append(
                {
                    "step": host.step,
                    "version": version,
                    "loss": host.loss,
                    "sample_id": host.sample_id.tolist(),
                    "sample_loss": host.sample_loss.tolist(),
                    "domain_loss_sum": host.domain_loss_sum.tolist(),
                    "domain_token_count": host.domain_token_count.tolist(),
                }
            )
        if self.attachment is not None:
            host.report_to(self.attachment, version)

    def flush(self) -> None:
        """Report the last step still in the host copy (end of training)."""
        self._emit(self.host.flush())
