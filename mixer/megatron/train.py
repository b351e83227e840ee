"""A small, deterministic pretraining loop for a megatron-core GPTModel fed by MixtureSampler.

Step numbers are 0-based and count optimizer steps: step t is the (t+1)-th update, drawn with
sampler.next_global_batch(t); a checkpoint "at step n" holds the state after n steps, and
resuming from it runs step n next. This matches Megatron's `iteration` counter.

Per step, in order: rank 0 polls the attachment and every rank gets the same new version
(versions.VersionChannel); the sampler applies it at its effective step and the instance
weighting follows the sampler's version; forward, instance-weighted loss, probes, backward,
optimizer. The step's statistics (and probe results) are reduced over data-parallel ranks on
the device and copied to the host asynchronously; rank 0 reports them one step later.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from tqdm import tqdm

from mixer.megatron.announce import AnnouncedVersions
from mixer.megatron.checkpoint import load_checkpoint, load_reference, save_checkpoint
from mixer.megatron.loss import AsyncHostCopy, LossHook, compute_loss, gather_samples
from mixer.megatron.model import ModelConfig, build_model, teardown
from mixer.megatron.probes import (
    AlignmentProbe,
    ExcessLossProbe,
    SampleAlignProbe,
    SelfInfluenceProbe,
    validation_loss,
)
from mixer.megatron.record import RunLog, TrainResult
from mixer.megatron.sampler import MixtureDataset, MixtureSampler, make_sample_id
from mixer.megatron.versions import VersionChannel

__all__ = [
    "Attachment",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "load_checkpoint",
    "load_reference",
    "save_checkpoint",
    "train",
]

log = logging.getLogger(__name__)


@runtime_checkable
class Attachment(Protocol):
    """The training loop's view of the mixing service (a session, a replay, or a test double)."""

    # Optional methods: poll_version(step) -> VersionUpdate-like | None (preferred over poll: it
    # carries params and blob, and a strict attachment may wait in it); report_validation(step=...,
    # domain_loss=np.ndarray[K] float64), called after each balanced evaluation.

    def poll(self) -> tuple[int, Sequence[float], int] | None:
        """A new (version, weights, effective_step), or None when nothing is new; never blocks."""
        ...

    def report(
        self,
        *,
        step: int,
        applied_version: int,
        domain_loss_sum: np.ndarray,
        domain_token_count: np.ndarray,
        domain_sample_count: np.ndarray,
        sample_loss: np.ndarray,
        sample_domain: np.ndarray,
        sample_id: np.ndarray,
        **signals: Any,
    ) -> None:
        """Hand over what step measured (signals: optional mixer.signals.Report fields); must not block."""
        ...


@dataclass
class TrainConfig:
    """Optimisation, evaluation, probe and checkpoint settings of one run."""

    steps: int = 20
    global_batch_size: int = 16
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int | None = None  # None: a tenth of the steps, at least 1
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 0
    seq_length: int = 64
    model: ModelConfig = field(default_factory=ModelConfig)
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate once, at the end
    eval_samples: int = 16  # per domain, the first ones of each validation set
    device: str = "cpu"
    checkpoint_dir: Path | None = None
    checkpoint_every: int = 0  # 0: no periodic checkpoints
    resume_from: Path | None = None  # a checkpoint_dir (uses its latest) or one step folder
    force_resume: bool = False  # load a sampler state saved for another job spec
    reference: Path | None = None  # checkpoint of a frozen reference model: DoReMi's excess loss
    align_every: int = 0  # DGA: per-domain gradient alignment every this many steps (0: off)
    align_samples: int = 2  # the least per domain and rank; else its share of the rank's batch
    align_target: list[int] = field(default_factory=list)  # target domains (empty: all)
    align_exclude_self: bool = True
    sample_align_every: int = 0  # DWM: per-sample alignment with the validation gradient (0: off)
    sample_align_samples: int = 8  # validation samples per domain for the validation gradient
    report_topics: bool = False  # send sample_topic (the samples' topic_ids rows) with every report
    strict: bool = False  # hand every step's report over before the next step (strict attachments)
    compare_every: int = 0  # benchmark: alternate blocks of this many steps detached / attached
    decay_steps: int | None = None  # the cosine decays to min_lr over this many steps (None: steps)
    override_lr_schedule: bool = False  # on resume, use this config's schedule, not the checkpoint's
    keep_steps: int = 1024  # per-step records TrainResult keeps in memory (the most recent)
    record: Path | None = None  # every reported step, one JSON line each (rank 0)

    def validate(self) -> None:
        """Raise ValueError on inconsistent settings, naming the setting."""
        self.model.validate()
        if self.steps < 0 or self.global_batch_size <= 0:
            raise ValueError("steps must be >= 0 and global_batch_size > 0")
        if self.model.seq_length != self.seq_length:
            raise ValueError(f"model.seq_length {self.model.seq_length} != seq_length {self.seq_length}")
        if not 0 < self.lr or not 0 <= self.min_lr <= self.lr:
            raise ValueError("need 0 < lr and 0 <= min_lr <= lr")
        if self.checkpoint_every and self.checkpoint_dir is None:
            raise ValueError("checkpoint_every needs checkpoint_dir")
        for name in ("align_every", "sample_align_every", "compare_every", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.align_samples <= 0 or self.sample_align_samples <= 0:
            raise ValueError("align_samples and sample_align_samples must be positive")
        if self.decay_steps is not None and self.decay_steps < 1:
            raise ValueError(f"decay_steps must be >= 1, got {self.decay_steps}")
        if self.keep_steps < 1:
            raise ValueError(f"keep_steps must be >= 1, got {self.keep_steps}")

    @property
    def warmup(self) -> int:
        """Warmup steps actually used."""
        return self.warmup_steps if self.warmup_steps is not None else max(1, self.steps // 10)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at decay_steps (the last step by default), then min_lr."""
    warmup = cfg.warmup
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, (cfg.decay_steps or cfg.steps) - warmup)
    progress = min(1.0, (step - warmup) / span)
    floor = cfg.min_lr / cfg.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Move a collated batch; non_blocking only helps with pinned sources on CUDA."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _world() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _is_rank0() -> bool:
    """True on the data-parallel rank that logs, reports and writes checkpoints."""
    dist = torch.distributed
    return not dist.is_initialized() or dist.get_rank() == 0


def _allreduce_grads(model: torch.nn.Module) -> None:
    """Average gradients over data-parallel ranks (plain torch; Megatron's DDP needs a GPU)."""
    if _world() <= 1:
        return
    for p in model.parameters():
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad.div_(_world())


def _resume_schedule(cfg: TrainConfig) -> None:
    """Keep the checkpoint's learning-rate schedule on resume (as Megatron's scheduler does).

    A resume that asks for more steps would otherwise stretch the cosine and jump the learning
    rate back up; with the checkpoint's decay the run continues smoothly (at min_lr past the end).
    """
    if cfg.override_lr_schedule or cfg.resume_from is None:
        return
    from mixer.megatron.checkpoint import read_checkpoint

    saved_json = read_checkpoint(cfg.resume_from).get("train_config")
    if not saved_json:
        return
    saved = json.loads(saved_json)
    decay = saved.get("decay_steps") or saved["steps"]
    warmup = saved["warmup_steps"] if saved.get("warmup_steps") is not None else max(1, saved["steps"] // 10)
    mine = (cfg.lr, cfg.min_lr, cfg.warmup, cfg.decay_steps or cfg.steps)
    theirs = (saved["lr"], saved["min_lr"], warmup, decay)
    if mine != theirs:
        log.info(
            "resume: keeping the checkpoint's learning-rate schedule (lr %g, min_lr %g, warmup %d, decay %d steps); "
            "pass override_lr_schedule (--override-lr-schedule) to use this run's",
            *theirs,
        )
    cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.decay_steps = theirs


def _world_group():
    return torch.distributed.group.WORLD


def _token_normalizer(loss_mask: torch.Tensor) -> torch.Tensor | None:
    """The global batch's loss tokens / ranks (None on one rank): see compute_loss. No host sync."""
    if _world() <= 1:
        return None
    tokens = loss_mask.float().sum()
    torch.distributed.all_reduce(tokens)
    return tokens / _world()


def evaluate(model: torch.nn.Module, val_datasets: Sequence[Any], cfg: TrainConfig) -> np.ndarray:
    """Balanced validation: each domain's first eval_samples samples scored on their own."""
    return validation_loss(model, val_datasets, cfg.eval_samples, cfg.global_batch_size, cfg.device)


def _checkpoint(cfg: TrainConfig, step: int, model, optimizer, scheduler, sampler, weighting) -> Path:
    """Save on rank 0 (every rank holds the same state); other ranks wait for it."""
    assert cfg.checkpoint_dir is not None
    folder = Path(cfg.checkpoint_dir) / f"step_{step:08d}"
    if _is_rank0():
        instance = weighting.state_dict() if weighting is not None else None
        folder = save_checkpoint(
            cfg.checkpoint_dir, step, model, optimizer, scheduler, sampler, cfg, instance
        )
    if _world() > 1:
        torch.distributed.barrier()
    return folder


def train(
    cfg: TrainConfig,
    datasets: Sequence[Any],
    val_datasets: Sequence[Any],
    sampler: MixtureSampler,
    attachment: Attachment | Any | None = None,
    progress: bool = True,
    *,
    weighting: Any = None,
    target_dataset: Any = None,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train up to cfg.steps (from the resume step, if any); builds and tears down the model.

    weighting: an instance.InstanceWeighting (None: plain token-mean loss). target_dataset: DGA's
    target data (None: the target domains). on_step(step) runs after every step (tests use it).
    """
    cfg.validate()
    num_domains = len(datasets)
    if sampler.num_domains != num_domains or sampler.global_batch_size != cfg.global_batch_size:
        raise ValueError("sampler domains / global batch size do not match the datasets / config")
    if val_datasets and len(val_datasets) != num_domains:
        raise ValueError(f"{len(val_datasets)} validation sets for {num_domains} domains")
    if cfg.sample_align_every and not val_datasets:
        raise ValueError("sample_align_every needs validation datasets (the validation gradient)")
    device = torch.device(cfg.device)
    model = build_model(cfg.model, cfg.device, seed=cfg.seed)
    sample_align = None
    # PRESENCE: every step's samples are scored during the forward (their weights need them).
    self_influence = SelfInfluenceProbe(model) if getattr(weighting, "needs_self_influence", False) else None
    try:
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, cfg=cfg))
        excess = (
            ExcessLossProbe(load_reference(cfg.reference, cfg.model, cfg.device), num_domains)
            if cfg.reference
            else None
        )
        align = None
        if cfg.align_every:
            align = AlignmentProbe(
                model,
                datasets,
                every=cfg.align_every,
                samples=cfg.align_samples,
                batch=cfg.global_batch_size // _world(),
                max_grad_norm=cfg.grad_clip,  # DoGE clips each domain's gradient as the step's
                target=cfg.align_target,
                target_dataset=target_dataset,
                exclude_self=cfg.align_exclude_self,
                device=device,
            )
        if cfg.sample_align_every:
            sample_align = SampleAlignProbe(
                model,
                val_datasets,
                every=cfg.sample_align_every,
                samples=cfg.sample_align_samples,
                device=device,
            )
        start = 0
        if cfg.resume_from is not None:
            start = load_checkpoint(
                cfg.resume_from, model, optimizer, scheduler, sampler, cfg.force_resume, weighting
            )
            _resume_schedule(cfg)
        elif sampler.step != 0:
            raise ValueError(f"sampler is at step {sampler.step} but training starts at step 0")
        channel = VersionChannel(attachment if _is_rank0() else None, num_domains)
        channel = channel if channel.active else None
        announced = None
        if channel is not None and channel.world > 1 and not cfg.strict:
            # Several ranks: versions announced ahead (an asynchronous broadcast, picked up a step
            # later), not a blocking broadcast at every step; strict mode keeps the per-step answer.
            announced = AnnouncedVersions(
                channel.attachment,
                num_domains,
                group=channel.group or _world_group(),
                src=0,
                is_src=_is_rank0(),
            )
        data = MixtureDataset(datasets)
        hook = LossHook(num_domains)
        host = AsyncHostCopy()
        bar = tqdm(
            total=cfg.steps,
            initial=start,
            desc="train",
            disable=not (progress and _is_rank0()),
            dynamic_ncols=True,
        )
        run = RunLog(cfg, attachment if _is_rank0() else None, bar, record=_is_rank0())
        r = run.result
        model.train()
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            # In a comparison run, even blocks are detached: no polls, reports, stats or probes.
            attached = not cfg.compare_every or (step // cfg.compare_every) % 2 == 1
            if announced is not None and attached:
                for a in announced.tick(step):
                    sampler.set_weights(a.update.weights, a.update.version, a.apply_step)
                    if weighting is not None:
                        weighting.offer(a.update)
            elif channel is not None and attached:
                update = channel.poll(step)
                if update is not None:
                    sampler.set_weights(update.weights, update.version, update.effective_step)
                    if weighting is not None:
                        weighting.offer(update)
            keys = sampler.next_rank_keys(step)
            run.versions[step] = sampler.version
            if attached:
                r.local_sample_ids.append([make_sample_id(d, i) for d, i in keys])
            if weighting is not None:
                weighting.sync(sampler.version)
            batch = _to_device(data.batch(keys), device)
            probe_sample = sample_align is not None and attached and sample_align.due(step)
            with (
                sample_align.capture(probe_sample) if sample_align is not None else nullcontext(),
                self_influence.capture(batch) if self_influence is not None else nullcontext(),
            ):
                per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
            extras: dict[str, torch.Tensor] = {}
            w = None
            if weighting is not None and weighting.enabled:
                mask = batch["loss_mask"].to(per_token.dtype)
                sample_loss = (per_token.detach() * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
                more = {}
                if self_influence is not None:
                    more["scores"] = self_influence.scores()
                    extras["sample_self_influence"] = gather_samples(more["scores"].float())
                w = weighting.weights(
                    step, sample_loss.float(), batch["dataset_id"], topics=batch.get("topic_ids"), **more
                )
                extras["sample_weight"] = gather_samples(w.float())
            if cfg.report_topics and attached:
                if "topic_ids" not in batch:
                    raise ValueError("report_topics needs datasets whose samples carry topic_ids (loader.with_topics)")
                extras["sample_topic"] = gather_samples(batch["topic_ids"].to(torch.int32))
            norm = _token_normalizer(batch["loss_mask"])
            if attached:
                loss, stats = hook(
                    per_token, batch["loss_mask"], batch["dataset_id"], batch["sample_id"], w, norm
                )
            else:
                loss, stats = compute_loss(
                    per_token,
                    batch["loss_mask"],
                    batch["dataset_id"],
                    num_domains,
                    instance_weights=w,
                    normalizer=norm,
                )
            if excess is not None and attached:
                extras["excess_loss_sum"] = excess.measure(batch, per_token)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            _allreduce_grads(model)
            if align is not None and attached and align.due(step):
                # Before the update: the step's parameters, mixture and learning rate (DoGE's lr_t).
                extras.update(align.measure(step, sampler.weights, scheduler.get_last_lr()[0]))
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            if probe_sample:
                # After the step: DWM's one-step unroll, <grad l_i(theta), grad L_val(theta')>.
                extras["sample_align"] = sample_align.measure(batch)
            if attached:
                run.emit(host.push(step, stats, extras))
                if cfg.strict:
                    run.emit(host.flush())
            else:
                run.versions.pop(step)
            r.step_times.append(time.perf_counter() - t0)
            r.attached.append(attached)
            bar.update(1)
            done = step + 1
            if attached and cfg.compare_every and done % cfg.compare_every == 0:
                run.emit(host.flush())  # the block ends: nothing of it may leak into the next
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
                # Drain the pending report first, so every step up to the checkpoint is reported.
                run.emit(host.flush())
                r.checkpoints.append(_checkpoint(cfg, done, model, optimizer, scheduler, sampler, weighting))
            if val_datasets and cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
                run.validation(done, evaluate(model, val_datasets, cfg))
            if on_step is not None:
                on_step(step)
        if announced is not None:
            announced.close()  # every rank, at the same point: the last broadcast in flight
        run.emit(host.flush())
        saved_final = bool(cfg.checkpoint_every) and cfg.steps % cfg.checkpoint_every == 0
        if cfg.checkpoint_dir is not None and cfg.steps > start and not saved_final:
            r.checkpoints.append(_checkpoint(cfg, cfg.steps, model, optimizer, scheduler, sampler, weighting))
        if val_datasets and cfg.steps > start:
            run.validation(cfg.steps, evaluate(model, val_datasets, cfg))
        bar.close()
        run.close()
        r.final_step = max(start, cfg.steps)
        r.applied = sampler.applied
        if len(r.step_times) > 2:
            r.step_time_s = float(np.median(r.step_times[2:]))
        return r
    finally:
        if sample_align is not None:
            sample_align.close()
        if self_influence is not None:
            self_influence.close()
        teardown()
