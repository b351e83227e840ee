"""Where a rank sits in megatron-core's parallel state, and the groups the worker side uses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Topology"]


@dataclass(kw_only=True)
class Topology:
    """This rank's place in megatron-core's parallel state, and the groups the plug-in uses."""

    rank: int = 0
    dp_rank: int = 0
    dp_size: int = 1
    tp_rank: int = 0
    tp_src: int = 0
    cp_size: int = 1
    first_stage: bool = True
    last_stage: bool = True
    dp_group: Any = None
    dp_cp_group: Any = None
    cp_group: Any = None
    tp_group: Any = None
    channel_group: Any = None
    channel_src: int = 0
    cp_rank: int = 0

    @property
    def reads_data(self) -> bool:
        """Tensor rank 0 of the first and last stages read batches (Megatron broadcasts to the rest)."""
        return self.tp_rank == 0 and (self.first_stage or self.last_stage)

    @property
    def reports(self) -> bool:
        return self.last_stage and self.tp_rank == 0 and self.dp_rank == 0 and self.cp_rank == 0

    @classmethod
    def from_parallel_state(cls, vp_stage: int | None = None) -> Topology:
        """Read megatron-core's parallel_state; builds the gloo channel group (collective: every rank calls it)."""
        from megatron.core import parallel_state as ps

        dist = torch.distributed
        ignore_virtual = vp_stage is None
        topo = cls(
            rank=dist.get_rank(),
            dp_rank=ps.get_data_parallel_rank(),
            dp_size=ps.get_data_parallel_world_size(),
            tp_rank=ps.get_tensor_model_parallel_rank(),
            tp_src=ps.get_tensor_model_parallel_src_rank(),
            cp_size=ps.get_context_parallel_world_size(),
            cp_rank=ps.get_context_parallel_rank(),
            first_stage=ps.is_pipeline_first_stage(ignore_virtual=ignore_virtual, vp_stage=vp_stage),
            last_stage=ps.is_pipeline_last_stage(ignore_virtual=ignore_virtual, vp_stage=vp_stage),
            dp_group=ps.get_data_parallel_group(),
            dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
            cp_group=ps.get_context_parallel_group(),
            tp_group=ps.get_tensor_model_parallel_group(),
        )
        # Who reads data and who reports, agreed by every rank; new_group is itself collective.
        roles: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(roles, (topo.rank, topo.reads_data, topo.reports))
        members = sorted(r for r, reads, _ in roles if reads)
        reporters = [r for r, _, rep in roles if rep]
        if len(reporters) != 1:
            raise RuntimeError(f"expected exactly one reporting rank, found {reporters}")
        topo.channel_src = reporters[0]
        topo.channel_group = dist.new_group(ranks=members, backend="gloo")
        return topo
