"""Worker body for the two-process gloo test of reduce_step_stats (spawned, so importable)."""

from __future__ import annotations

import os

import torch

from mixer.megatron.loss import LossHook


def batch_for(rank: int) -> tuple[torch.Tensor, ...]:
    """A deterministic per-rank batch: per-token losses, mask, domains, sample ids."""
    g = torch.Generator().manual_seed(100 + rank)
    per_token = torch.rand(4, 6, generator=g)
    mask = (torch.rand(4, 6, generator=g) > 0.2).float()
    domain = torch.tensor([0, 2, 2, 1]) if rank == 0 else torch.tensor([1, 1, 0, 0])
    ids = torch.arange(4) + 10 * rank
    return per_token, mask, domain, ids


def run(rank: int, world: int, port: int, out_dir: str) -> None:
    """Join the group, reduce one batch's stats, save them for the parent to check."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _, stats = LossHook(3)(*batch_for(rank)[:3], sample_id=batch_for(rank)[3])
        torch.save({k: v for k, v in vars(stats).items()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()
