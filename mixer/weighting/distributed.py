"""The two collectives instance weighting needs over the data-parallel group.

Weights are normalised over the global batch, so every rank must see the same batch-level
numbers. Both helpers are no-ops without torch.distributed or with one rank, so the same code
runs in a single-process test, in the service, and on a Megatron worker.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def world_size(group: Any = None) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def gather_batch(local: torch.Tensor, group: Any = None) -> tuple[torch.Tensor, int]:
    """The all-gathered global batch (rank order) and where this rank's slice starts.

    Local batches must have equal length on every rank, as Megatron's micro-batches do.
    """
    world = world_size(group)
    if world == 1:
        return local, 0
    out = torch.empty((world * local.shape[0], *local.shape[1:]), dtype=local.dtype, device=local.device)
    dist.all_gather_into_tensor(out, local.contiguous(), group=group)
    return out, dist.get_rank(group) * local.shape[0]


def sum_over_ranks(t: torch.Tensor, group: Any = None) -> torch.Tensor:
    """`t` summed over the group (a copy; `t` is left as it was)."""
    out = t.clone()
    if world_size(group) > 1:
        dist.all_reduce(out, group=group)
    return out
