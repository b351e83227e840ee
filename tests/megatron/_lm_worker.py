"""One rank of the Megatron-LM plug-in tests: megatron-core's parallel_state on gloo, Megatron's call pattern.

Megatron-LM's pipeline schedules need CUDA, so this worker drives the plug-in the way the
schedule does, with megatron-core's own pieces where they run on the CPU: `parallel_state` groups,
`forward_step_calc_loss` (the schedule's loss arithmetic), and a two-stage "model" whose first stage
sends activations to the last one (so a blocking collective between stages would deadlock here as
it would on GPUs). Usage: python _lm_worker.py CONFIG.json RANK.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import warnings
from functools import partial

warnings.filterwarnings("ignore")

import numpy as np
import torch


def per_token_loss(hidden: torch.Tensor, labels: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """The last stage's loss: a smooth function of the first stage's activations and the labels."""
    return torch.nn.functional.softplus(hidden - theta[labels])


def first_stage(tokens: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    return emb[tokens]


def gpt_config(seq: int, cache: str):
    """The GPTDatasetConfig a Megatron-LM user would pass: our byte tokenizer, a 90/10 split."""
    from mixer.megatron.data import gpt_config as byte_config

    return byte_config(seq, 0, cache, split="90,10,0")


def cp_slice(t: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This context-parallel rank's part of each sequence: chunks r and 2cp-1-r of 2cp (Megatron's balance)."""
    if size == 1:
        return t
    chunks = t.reshape(t.shape[0], 2 * size, -1)
    return torch.cat([chunks[:, rank], chunks[:, 2 * size - 1 - rank]], dim=1)


def model_params(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(vocab, generator=g), torch.randn(vocab, generator=g)


def main(config_path: str, rank: int) -> None:
    with open(config_path) as fh:
        cfg = json.load(fh)
    # A deadlock shows where each rank waits, in the test's output, before the test gives up.
    faulthandler.dump_traceback_later(cfg.get("dump_after", 200), exit=True)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(cfg["port"])
    dist = torch.distributed
    dist.init_process_group("gloo", rank=rank, world_size=cfg["world"])
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel.schedules import forward_step_calc_loss
    from megatron.core.transformer import TransformerConfig

    from mixer.megatron import lm
    from mixer.spec import JobSpec

    ps.initialize_model_parallel(cfg["tp"], cfg["pp"], context_parallel_size=cfg.get("cp", 1))
    with open(cfg["spec"]) as fh:
        spec = JobSpec.from_yaml(fh.read())
    data_config = gpt_config(cfg["seq"], cfg["cache"])
    settings = lm.LMSettings(
        spec=spec,
        micro_batch_size=cfg["mbs"],
        global_batch_size=cfg["gbs"],
        num_workers=cfg["workers"],
        sync_interval=cfg["sync"],
        address=cfg.get("address"),
        source="megatron",
    )
    train, _, plugin = lm.build(data_config, settings)
    topo = plugin.topo
    plugin.reporter.keep_records = True
    mconfig = TransformerConfig(
        num_layers=1, hidden_size=8, num_attention_heads=1, calculate_per_token_loss=cfg["per_token"]
    )
    emb, theta = model_params(257)
    theta.requires_grad_(True)
    mbs, seq = cfg["mbs"], cfg["seq"]
    num_mb = cfg["gbs"] // (mbs * topo.dp_size)
    consumed: list[list[int]] = []
    total_tokens = torch.zeros(())

    def user_loss_func(loss_mask, output_tensor):
        # pretrain_gpt.py's loss_func contract: (loss sum, token count, report [sum, count]).
        losses = output_tensor.view(-1).float()
        mask = loss_mask.view(-1).float()
        loss = torch.sum(losses * mask)
        num_tokens = mask.sum().clone().detach().to(torch.int)
        return loss, num_tokens, {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}

    for step in range(cfg["steps"]):
        for _ in range(num_mb):
            batch = None
            if topo.reads_data:
                batch = next(train)
                consumed.append(
                    [int(x) for x in train.last_meta.sample_id.tolist()] if topo.first_stage else []
                )
            tp_world = dist.get_world_size(topo.tp_group)
            if topo.first_stage:
                tokens = batch["tokens"] if batch is not None else torch.zeros(mbs, seq, dtype=torch.int64)
                if tp_world > 1:
                    dist.broadcast(tokens, src=topo.tp_src, group=topo.tp_group)
                hidden = first_stage(cp_slice(tokens, topo.cp_rank, topo.cp_size), emb)
                if not topo.last_stage:
                    dist.send(hidden, ps.get_pipeline_model_parallel_next_rank())
            if topo.last_stage:
                labels = batch["labels"] if batch is not None else torch.zeros(mbs, seq, dtype=torch.int64)
                mask = batch["loss_mask"] if batch is not None else torch.zeros(mbs, seq)
                if tp_world > 1:
                    dist.broadcast(labels, src=topo.tp_src, group=topo.tp_group)
                    dist.broadcast(mask, src=topo.tp_src, group=topo.tp_group)
                labels = cp_slice(labels, topo.cp_rank, topo.cp_size)
                mask = cp_slice(mask, topo.cp_rank, topo.cp_size)
                meta = lm.batch_meta(train, topo, mbs)
                if not topo.first_stage:
                    hidden = torch.empty(mbs, seq)
                    dist.recv(hidden, ps.get_pipeline_model_parallel_prev_rank())
                out = per_token_loss(hidden, labels, theta)
                loss_func = lm.wrap_loss(partial(user_loss_func, mask), mask, meta, reporter=plugin.reporter)
                output, num_tokens = forward_step_calc_loss(
                    None,
                    out,
                    loss_func,
                    mconfig,
                    None,
                    False,
                    num_mb,
                    [],
                    cp_group_size=topo.cp_size,
                    is_last_stage=True,
                )
                output.backward()
                total_tokens += num_tokens
        # Megatron's step ends with data-parallel gradient reduction and model-parallel reductions.
        if topo.last_stage and theta.grad is not None:
            if cfg["per_token"]:
                dist.all_reduce(theta.grad, group=topo.dp_cp_group)
                tokens_all = total_tokens.clone()
                dist.all_reduce(tokens_all, group=topo.dp_cp_group)
                theta.grad /= tokens_all.clamp(min=1)
            else:
                dist.all_reduce(theta.grad, group=topo.dp_cp_group)
                theta.grad /= dist.get_world_size(topo.dp_cp_group)
            if step == 0:
                np.save(os.path.join(cfg["out"], f"grad{rank}.npy"), theta.grad.numpy())
            theta.grad = None
            total_tokens.zero_()
        flag = torch.ones(())
        dist.all_reduce(flag, group=ps.get_model_parallel_group())
        dist.all_reduce(flag, group=ps.get_data_parallel_group())
    plugin.reporter.flush()
    if train is not None:
        train.channel.close()
    if plugin.attachment is not None:
        plugin.attachment.close(timeout=60)
    result = {
        "rank": rank,
        "reads_data": topo.reads_data,
        "first": topo.first_stage,
        "last": topo.last_stage,
        "tp_rank": topo.tp_rank,
        "cp_rank": topo.cp_rank,
        "dp_rank": topo.dp_rank,
        "reports": topo.reports,
        "reported": plugin.reporter.reported,
        "applied": train.sampler.applied if train is not None else None,
        "consumed": consumed,
        "host": plugin.reporter.recorded,
        "weights": plugin.reporter.weights_seen,
    }
    with open(os.path.join(cfg["out"], f"rank{rank}.json"), "w") as fh:
        json.dump(result, fh)
    ps.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
