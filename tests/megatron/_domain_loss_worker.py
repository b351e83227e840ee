"""Worker body for the two-process gloo test of per-domain loss weights (spawned, so importable).

Each rank holds half of one global batch and computes, from the same version's loss weights:
(1) the plain loop's loss (compute_loss with the data-parallel normaliser) and its gradient;
(2) the Megatron-LM plug-in's path: two micro-batches through LossReporter's wrapper around a
loss_func with Megatron's per-token contract (loss sum, token count).
"""

from __future__ import annotations

import os

import torch

from mixer.megatron.instance import InstanceWeighting
from mixer.megatron.loader import MicroBatchMeta
from mixer.megatron.loss import compute_loss
from mixer.megatron.reporting import LossReporter
from mixer.megatron.topology import Topology
from mixer.megatron.versions import VersionUpdate
from mixer.spec import JobSpec

K = 3
LOSS_WEIGHTS = [0.5, 1.75, 0.25]  # the version's domain_loss_weights


def spec() -> JobSpec:
    return JobSpec.from_dict(
        {"name": "dl", "domains": [f"d{i}" for i in range(K)], "strategy": {"name": "doremi"}}
    )


def batch_for(rank: int) -> tuple[torch.Tensor, ...]:
    """A deterministic per-rank batch of 4 samples: per-token losses, mask, domains, sample ids."""
    g = torch.Generator().manual_seed(300 + rank)
    per_token = torch.rand(4, 6, generator=g, dtype=torch.float64).float()
    mask = (torch.rand(4, 6, generator=g) > 0.25).float()
    domain = torch.tensor([0, 2, 1, 1]) if rank == 0 else torch.tensor([2, 2, 0, 1])
    ids = torch.arange(4) + 10 * rank
    return per_token, mask, domain, ids


def run(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        own = [torch.distributed.new_group([r]) for r in range(world)]  # tensor-parallel size 1
        per_token, mask, domain, ids = batch_for(rank)
        weighting = InstanceWeighting(spec(), group=torch.distributed.group.WORLD)
        weighting.offer(VersionUpdate(1, 0, (1 / K,) * K, params={"domain_loss_weights": LOSS_WEIGHTS}))
        weighting.sync(1)

        # (1) The plain loop: weights from InstanceWeighting, normaliser = global tokens / ranks.
        leaf = per_token.clone().requires_grad_()
        tokens = mask.sum()
        torch.distributed.all_reduce(tokens)
        w = weighting.weights(0, torch.zeros(4), domain)
        loss, _ = compute_loss(leaf, mask, domain, K, instance_weights=w, normalizer=tokens / world)
        loss.backward()
        grad = leaf.grad.clone()
        plain_loss = loss.detach().clone()
        torch.distributed.all_reduce(plain_loss)  # data parallelism optimises the mean over ranks
        plain_loss /= world

        # (2) The plug-in: two micro-batches of 2 through LossReporter, per-token loss contract.
        topo = Topology(rank=rank, dp_rank=rank, dp_size=world, dp_group=None, tp_group=own[rank])
        reporter = LossReporter(K, topo, weighting=weighting)
        reporter.keep_records = True
        leaf2 = per_token.clone().requires_grad_()
        sums, counts = [], []
        for m in range(2):
            sl = slice(2 * m, 2 * m + 2)
            meta = MicroBatchMeta(
                dataset_id=domain[sl], sample_id=ids[sl], step=0, index=m, num_microbatches=2, version=1
            )
            mb_mask = mask[sl]

            def loss_func(output_tensor: torch.Tensor, mb_mask=mb_mask):
                losses = output_tensor.float().reshape(-1)
                return (losses * mb_mask.reshape(-1)).sum(), mb_mask.sum()

            loss_sum, num_tokens = reporter(loss_func, mb_mask, meta)(leaf2[sl].reshape(-1))
            sums.append(loss_sum)
            counts.append(num_tokens)
        total = torch.stack(sums).sum()
        total.backward()
        reporter.flush()
        global_sum = total.detach().clone()
        global_tokens = torch.stack(counts).sum()
        torch.distributed.all_reduce(global_sum)
        torch.distributed.all_reduce(global_tokens)
        torch.save(
            {
                "plain_loss": plain_loss,
                "plain_grad": grad,
                "weights": w,
                "plugin_loss": global_sum / global_tokens,
                "plugin_grad": leaf2.grad.clone(),
                "plugin_record": reporter.recorded[0] if reporter.recorded else None,  # the reporting rank
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        torch.distributed.destroy_process_group()
