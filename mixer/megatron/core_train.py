"""Our pretraining script on GPUs, on megatron-core's own training machinery.

`python -m mixer.megatron.pretrain --device cuda` (one process per GPU under torchrun) trains
here: `get_forward_backward_func` (micro-batches, the pipeline schedules), megatron-core's
`DistributedDataParallel`, `get_megatron_optimizer` (the distributed optimizer, fp32 master
weights, bf16 compute), `OptimizerParamScheduler` (its schedule is saved and kept on resume) and
`dist_checkpointing`, with tensor and pipeline parallel sizes as options. The data, loss, version
and mixture-state pieces are the Megatron-LM plug-in's (mixer.megatron.lm): the same code the
CPU tests run on megatron-core's parallel state. Per-token loss (`calculate_per_token_loss`): the
step optimises the (instance-weighted) loss sum over the global token count.

The schedules need CUDA, so this path runs only on GPUs (tests marked `gpu`); the CPU keeps the
plain loop of mixer.megatron.train.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mixer.config import to_dict
from mixer.megatron.config import ParallelConfig, TrainConfig

log = logging.getLogger(__name__)

__all__ = ["train_core"]


def _model(t: TrainConfig, p: ParallelConfig):
    """One GPTModel chunk for this pipeline stage, bf16 through Float16Module, in megatron-core DDP."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import Float16Module

    config = TransformerConfig(
        num_layers=t.model.num_layers,
        hidden_size=t.model.hidden_size,
        num_attention_heads=t.model.num_attention_heads,
        tensor_model_parallel_size=p.tensor_parallel,
        pipeline_model_parallel_size=p.pipeline_parallel,
        bf16=True,
        params_dtype=torch.bfloat16,
        pipeline_dtype=torch.bfloat16,
        calculate_per_token_loss=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(),
        vocab_size=t.model.vocab_size,
        max_sequence_length=t.model.seq_length,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        position_embedding_type="learned_absolute",
        share_embeddings_and_output_weights=False,
    ).cuda()
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=True
    )
    model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=Float16Module(config, gpt))
    model.broadcast_params()
    return config, model


def _optimizer(t: TrainConfig, model):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=0.9,
        adam_beta2=0.95,
        bf16=True,
        params_dtype=torch.bfloat16,
        clip_grad=t.grad_clip,
        use_distributed_optimizer=True,
    )
    optimizer = get_megatron_optimizer(opt_config, [model])
    # Megatron's scheduler counts samples; a resume keeps the checkpoint's schedule unless overridden.
    gbs = t.global_batch_size
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=t.warmup * gbs,
        lr_decay_steps=(t.decay_steps or t.steps) * gbs,
        lr_decay_style="cosine",
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=t.steps * gbs,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=not t.override_lr_schedule,
        override_opt_param_scheduler=t.override_lr_schedule,
    )
    return optimizer, scheduler


def _tp_batch(
    batch: dict[str, torch.Tensor] | None, topo: Any, mbs: int, seq: int
) -> dict[str, torch.Tensor]:
    """The micro-batch on every tensor-parallel rank (what Megatron-LM's get_batch_on_this_tp_rank does)."""
    keys = {
        "tokens": torch.int64,
        "position_ids": torch.int64,
        "labels": torch.int64,
        "loss_mask": torch.float32,
    }
    out = {}
    for key, dtype in keys.items():
        if batch is not None:
            out[key] = batch[key].cuda(non_blocking=True)
        else:
            out[key] = torch.empty((mbs, seq), dtype=dtype, device="cuda")
        if torch.distributed.get_world_size(topo.tp_group) > 1:
            torch.distributed.broadcast(out[key], src=topo.tp_src, group=topo.tp_group)
    return out


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """pretrain_gpt.py's contract: (loss sum, token count, {"lm loss": [sum, count]})."""
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}


def _save(t: TrainConfig, step: int, model, optimizer, scheduler, train_iter) -> Path:
    from megatron.core import dist_checkpointing

    assert t.checkpoint_dir is not None
    folder = Path(t.checkpoint_dir) / f"iter_{step:07d}"
    folder.mkdir(parents=True, exist_ok=True)
    model_sd = model.sharded_state_dict()
    dist_checkpointing.save(
        {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd)}, str(folder)
    )
    if torch.distributed.get_rank() == 0:
        # Rank 0 is tensor rank 0 of the first stage: it reads data, and every loader holds the same state.
        torch.save(
            {"step": step, "scheduler": scheduler.state_dict(), "loader": train_iter.save_state()},
            folder / "mixer.pt",
        )
        (Path(t.checkpoint_dir) / "latest").write_text(folder.name + "\n")
    torch.distributed.barrier()
    return folder


def _load(t: TrainConfig, model, optimizer, scheduler, train_iter) -> int:
    from megatron.core import dist_checkpointing

    assert t.resume_from is not None
    root = Path(t.resume_from)
    folder = root / (root / "latest").read_text().strip() if (root / "latest").is_file() else root
    extra = torch.load(folder / "mixer.pt", map_location="cpu", weights_only=False)
    model_sd = model.sharded_state_dict()
    state = dist_checkpointing.load(
        {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True)}, str(folder)
    )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    if train_iter is not None:
        train_iter.load_state(extra["loader"])
    return int(extra["step"])


def train_core(
    t: TrainConfig,
    p: ParallelConfig,
    spec: Any,
    *,
    address: str | None = None,
    token: str | None = None,
    source: str = "megatron",
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Train on this rank's GPU; returns a JSON-able summary (the reporting rank's loss curve)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from mixer.megatron.record import Recent

    model, optimizer, scheduler, train_iter, plugin = _setup(t, p, spec, address, token, source, cache_dir)
    topo = plugin.topo
    start = _load(t, model, optimizer, scheduler, train_iter) if t.resume_from else 0
    num_mb = t.global_batch_size // (p.micro_batch_size * topo.dp_size)
    attached = [True]
    forward_step = _forward_step(t, p, plugin, attached)
    forward_backward = get_forward_backward_func()
    # Bounded per-step state: the most recent losses and step times only.
    losses: list[torch.Tensor] = Recent(1024)
    step_times: list[float] = Recent(4096)
    times: dict[bool, list[float]] = {True: Recent(4096), False: Recent(4096)}
    for step in range(start, t.steps):
        t0 = time.perf_counter()
        attached[0] = not t.compare_every or (step // t.compare_every) % 2 == 1
        model.zero_grad_buffer()
        optimizer.zero_grad()
        reduced = forward_backward(
            forward_step_func=forward_step,
            data_iterator=train_iter,
            model=[model],
            num_microbatches=num_mb,
            seq_length=t.model.seq_length,
            micro_batch_size=p.micro_batch_size,
            decoder_seq_length=t.model.seq_length,
            forward_only=False,
        )
        ok, grad_norm, _ = optimizer.step()
        if ok:
            scheduler.step(increment=t.global_batch_size)
        if reduced and ps.is_pipeline_last_stage():
            total = torch.stack([r["lm loss"] for r in reduced]).sum(0)
            losses.append(total)  # on the device: read once, at the end
        torch.cuda.synchronize()
        step_times.append(time.perf_counter() - t0)
        if t.compare_every and step % t.compare_every:  # the first step of a block is left out
            times[attached[0]].append(step_times[-1])
        done = step + 1
        if t.checkpoint_dir and t.checkpoint_every and done % t.checkpoint_every == 0:
            _save(t, done, model, optimizer, scheduler, train_iter)
        if t.log_every and done % t.log_every == 0 and topo.reports and losses:
            last = losses[-1]
            log.info(
                "step %d loss %.4f grad norm %.3f", step, float(last[0] / last[1]), float(grad_norm or 0)
            )
    delivered = plugin.close()
    return _summary(t, p, start, losses, step_times, times, plugin, delivered)


def _setup(
    t: TrainConfig,
    p: ParallelConfig,
    spec: Any,
    address: str | None,
    token: str | None,
    source: str,
    cache_dir: Path | None,
):
    """Model parallelism, the model, its optimizer and scheduler, and the mixer's data plug-in:
    (model, optimizer, scheduler, train_iter, plugin)."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    from mixer.megatron import lm
    from mixer.megatron.data import gpt_config

    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(p.tensor_parallel, p.pipeline_parallel)
    tensor_parallel.model_parallel_cuda_manual_seed(t.seed)
    config, model = _model(t, p)
    optimizer, scheduler = _optimizer(t, model)
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads

    data_config = gpt_config(t.model.seq_length, t.seed, cache_dir)
    settings = lm.LMSettings(
        spec=spec,
        micro_batch_size=p.micro_batch_size,
        global_batch_size=t.global_batch_size,
        num_workers=p.num_workers,
        address=address,
        token=token,
        source=source,
    )
    train_iter, _, plugin = lm.build(data_config, settings, validation=False)
    return model, optimizer, scheduler, train_iter, plugin


def _forward_step(t: TrainConfig, p: ParallelConfig, plugin: Any, attached: list[bool]):
    """Megatron's forward_step: the mixer's loss wrapper while `attached[0]` holds."""
    from mixer.megatron import lm

    topo = plugin.topo

    def forward_step(data_iterator, gpt):
        batch = next(data_iterator) if topo.reads_data else None
        b = _tp_batch(batch, topo, p.micro_batch_size, t.model.seq_length)
        meta = lm.batch_meta(data_iterator, topo, p.micro_batch_size)
        output = gpt(b["tokens"], b["position_ids"], None, labels=b["labels"])
        loss_func = partial(_loss_func, b["loss_mask"])
        if not attached[0]:
            return output, loss_func
        return output, lm.wrap_loss(loss_func, b["loss_mask"], meta, plugin.reporter)

    return forward_step


def _summary(
    t: TrainConfig,
    p: ParallelConfig,
    start: int,
    losses: list[torch.Tensor],
    step_times: list[float],
    times: dict[bool, list[float]],
    plugin: Any,
    delivered: bool,
) -> dict[str, Any]:
    curve = [float(x[0] / x[1]) for x in losses]
    return {
        "final_step": max(start, t.steps),
        "losses": curve,
        "step_time_s": float(np.median(step_times[2:])) if len(step_times) > 2 else None,
        "step_time_attached_s": float(np.median(times[True])) if times[True] else None,
        "step_time_detached_s": float(np.median(times[False])) if times[False] else None,
        "reported": list(plugin.reporter.reported),
        "all_reports_acknowledged": delivered,
        "config": {"train": to_dict(t), "parallel": to_dict(p)},
    }
