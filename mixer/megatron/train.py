"""A small, deterministic pretraining loop for a megatron-core GPTModel fed by MixtureSampler.

Step numbers are 0-based and count optimizer steps: step t is the (t+1)-th update, drawn with
sampler.next_global_batch(t); a checkpoint "at step n" holds the state after n steps, and
resuming from it runs step n next. This matches Megatron's `iteration` counter.

Per step, in order: rank 0 polls the attachment and every rank gets the same new version
(versions.VersionChannel); the sampler applies it at its effective step and the instance
weighting follows the sampler's version; forward, instance-weighted loss, probes, backward,
optimizer. The step's statistics (and probe results) are reduced over data-parallel ranks on
the device and copied to the host asynchronously; rank 0 reports them one step later.

Trainer holds one run's state: Trainer.step is one step, Trainer.checkpoint and Trainer.evaluate
the periodic saves and evaluations, Trainer.run the whole run; train() builds one and runs it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from tqdm import tqdm

from mixer.config import check
from mixer.megatron.announce import AnnouncedVersions
from mixer.megatron.checkpoint import load_checkpoint, load_reference, save_checkpoint
from mixer.megatron.config import TrainConfig
from mixer.megatron.loss import AsyncHostCopy, LossHook, compute_loss, gather_samples
from mixer.megatron.model import build_model, teardown
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
from mixer.weighting.token import domain_mean_weight

__all__ = [
    "Attachment",
    "TrainConfig",
    "TrainResult",
    "Trainer",
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


class Trainer:
    """One run: model, optimizer, probes and reporting; `run` trains from the resume step to cfg.steps.

    `step` is one optimizer step (versions, batch, forward, instance weights, loss and probes,
    backward, update, report) followed by the periodic `checkpoint` and `evaluate`. `run` builds the
    model, runs the steps, reports and saves the last one, and tears the model down.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        datasets: Sequence[Any],
        val_datasets: Sequence[Any],
        sampler: MixtureSampler,
        attachment: Attachment | Any | None = None,
        *,
        weighting: Any = None,
        target_dataset: Any = None,
        on_step: Callable[[int], None] | None = None,
    ) -> None:
        check(cfg)
        num_domains = len(datasets)
        if sampler.num_domains != num_domains or sampler.global_batch_size != cfg.global_batch_size:
            raise ValueError("sampler domains / global batch size do not match the datasets / config")
        if val_datasets and len(val_datasets) != num_domains:
            raise ValueError(f"{len(val_datasets)} validation sets for {num_domains} domains")
        if cfg.sample_align_every and not val_datasets:
            raise ValueError("sample_align_every needs validation datasets (the validation gradient)")
        self.cfg = cfg
        self.datasets = datasets
        self.val_datasets = val_datasets
        self.sampler = sampler
        self.attachment = attachment
        self.weighting = weighting
        self.target_dataset = target_dataset
        self.on_step = on_step
        self.num_domains = num_domains
        self.device = torch.device(cfg.device)
        self.model: torch.nn.Module | None = None
        self.self_influence: SelfInfluenceProbe | None = None
        self.sample_align: SampleAlignProbe | None = None
        self.align: AlignmentProbe | None = None
        self.excess: ExcessLossProbe | None = None
        self.channel: VersionChannel | None = None
        self.announced: AnnouncedVersions | None = None
        self.start = 0

    def run(self, progress: bool = True) -> TrainResult:
        """Train up to cfg.steps (from the resume step, if any); builds and tears down the model."""
        self.model = build_model(self.cfg.model, self.cfg.device, seed=self.cfg.seed or 0)
        # PRESENCE: every step's samples are scored during the forward (their weights need them).
        if getattr(self.weighting, "needs_self_influence", False):
            self.self_influence = SelfInfluenceProbe(self.model)
        if getattr(self.weighting, "needs_reference", False) and not self.cfg.reference:
            raise ValueError("weighting token-reference needs a reference model (--reference CKPT)")
        try:
            self._build_optimizer_and_probes()
            self._resume()
            self._connect(progress)
            self.model.train()
            for step in range(self.start, self.cfg.steps):
                self.step(step)
            return self._finish()
        finally:
            self.close()

    def _build_optimizer_and_probes(self) -> None:
        cfg, model = self.cfg, self.model
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, partial(lr_factor, cfg=cfg))
        if cfg.reference:
            self.excess = ExcessLossProbe(
                load_reference(cfg.reference, cfg.model, cfg.device), self.num_domains
            )
        if cfg.align_every:
            self.align = AlignmentProbe(
                model,
                self.datasets,
                every=cfg.align_every,
                samples=cfg.align_samples,
                batch=cfg.global_batch_size // _world(),
                max_grad_norm=cfg.grad_clip,  # DoGE clips each domain's gradient as the step's
                target=cfg.align_target,
                target_dataset=self.target_dataset,
                exclude_self=cfg.align_exclude_self,
                device=self.device,
            )
        if cfg.sample_align_every:
            self.sample_align = SampleAlignProbe(
                model,
                self.val_datasets,
                every=cfg.sample_align_every,
                samples=cfg.sample_align_samples,
                device=self.device,
            )

    def _resume(self) -> None:
        cfg = self.cfg
        if cfg.resume_from is not None:
            self.start = load_checkpoint(
                cfg.resume_from,
                self.model,
                self.optimizer,
                self.scheduler,
                self.sampler,
                cfg.force_resume,
                self.weighting,
            )
            _resume_schedule(cfg)
        elif self.sampler.step != 0:
            raise ValueError(f"sampler is at step {self.sampler.step} but training starts at step 0")

    def _connect(self, progress: bool) -> None:
        """The version channel to the attachment, the data, the loss hook and the run's reporting."""
        cfg = self.cfg
        channel = VersionChannel(self.attachment if _is_rank0() else None, self.num_domains)
        self.channel = channel if channel.active else None
        if self.channel is not None and self.channel.world > 1 and not cfg.strict:
            # Several ranks: versions announced ahead (an asynchronous broadcast, picked up a step
            # later), not a blocking broadcast at every step; strict mode keeps the per-step answer.
            self.announced = AnnouncedVersions(
                self.channel.attachment,
                self.num_domains,
                group=self.channel.group or _world_group(),
                src=0,
                is_src=_is_rank0(),
            )
        self.data = MixtureDataset(self.datasets)
        self.hook = LossHook(self.num_domains)
        self.host = AsyncHostCopy()
        self.bar = tqdm(
            total=cfg.steps,
            initial=self.start,
            desc="train",
            disable=not (progress and _is_rank0()),
            dynamic_ncols=True,
        )
        self.runlog = RunLog(cfg, self.attachment if _is_rank0() else None, self.bar, record=_is_rank0())

    def step(self, step: int) -> None:
        """Run optimizer step `step` (0-based), report it, then checkpoint and evaluate when due."""
        cfg, r, sampler = self.cfg, self.runlog.result, self.sampler
        t0 = time.perf_counter()
        # In a comparison run, even blocks are detached: no polls, reports, stats or probes.
        attached = not cfg.compare_every or (step // cfg.compare_every) % 2 == 1
        if attached:
            self._take_versions(step)
        keys = sampler.next_rank_keys(step)
        self.runlog.versions[step] = sampler.version
        if attached:
            r.local_sample_ids.append([make_sample_id(d, i) for d, i in keys])
        if self.weighting is not None:
            self.weighting.sync(sampler.version)
        batch = _to_device(self.data.batch(keys), self.device)
        probe_sample = self.sample_align is not None and attached and self.sample_align.due(step)
        per_token = self._forward(batch, probe_sample)
        extras: dict[str, torch.Tensor] = {}
        w = self._instance_weights(step, batch, per_token, extras)
        if cfg.report_topics and attached:
            if "topic_ids" not in batch:
                raise ValueError(
                    "report_topics needs datasets whose samples carry topic_ids (loader.with_topics)"
                )
            extras["sample_topic"] = gather_samples(batch["topic_ids"].to(torch.int32))
        # One reference forward serves DoReMi's excess loss and PRIOR's token weights.
        ref_loss = None
        if self.excess is not None and (attached or getattr(self.weighting, "needs_reference", False)):
            ref_loss = self.excess.reference_token_loss(batch)
        tw = self._token_weights(step, batch, per_token, ref_loss, attached, extras)
        loss, stats = self._loss(batch, per_token, w, attached, tw)
        if self.excess is not None and attached:
            extras["excess_loss_sum"] = self.excess.measure(batch, per_token, ref_loss)
        self._update(step, loss, attached, extras)
        if probe_sample:
            # After the step: DWM's one-step unroll, <grad l_i(theta), grad L_val(theta')>.
            extras["sample_align"] = self.sample_align.measure(batch)
        if attached:
            self.runlog.emit(self.host.push(step, stats, extras))
            if cfg.strict:
                self.runlog.emit(self.host.flush())
        else:
            self.runlog.versions.pop(step)
        r.step_times.append(time.perf_counter() - t0)
        r.attached.append(attached)
        self.bar.update(1)
        self._after_step(step + 1, attached)
        if self.on_step is not None:
            self.on_step(step)

    def _take_versions(self, step: int) -> None:
        """Apply the versions due at this step to the sampler and the instance weighting."""
        if self.announced is not None:
            for a in self.announced.tick(step):
                self.sampler.set_weights(a.update.weights, a.update.version, a.apply_step)
                if self.weighting is not None:
                    self.weighting.offer(a.update)
        elif self.channel is not None:
            update = self.channel.poll(step)
            if update is not None:
                self.sampler.set_weights(update.weights, update.version, update.effective_step)
                if self.weighting is not None:
                    self.weighting.offer(update)

    def _forward(self, batch: dict[str, torch.Tensor], probe_sample: bool) -> torch.Tensor:
        """Per-token losses, with the probes that watch the forward capturing."""
        sample_align, self_influence = self.sample_align, self.self_influence
        with (
            sample_align.capture(probe_sample) if sample_align is not None else nullcontext(),
            self_influence.capture(batch) if self_influence is not None else nullcontext(),
        ):
            return self.model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

    def _instance_weights(
        self,
        step: int,
        batch: dict[str, torch.Tensor],
        per_token: torch.Tensor,
        extras: dict[str, torch.Tensor],
    ) -> torch.Tensor | None:
        """The samples' instance weights (None: plain token-mean loss); adds what they report to extras."""
        weighting = self.weighting
        if weighting is None or not weighting.enabled:
            return None
        mask = batch["loss_mask"].to(per_token.dtype)
        sample_loss = (per_token.detach() * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        more = {}
        if self.self_influence is not None:
            more["scores"] = self.self_influence.scores()
            extras["sample_self_influence"] = gather_samples(more["scores"].float())
        w = weighting.weights(
            step, sample_loss.float(), batch["dataset_id"], topics=batch.get("topic_ids"), **more
        )
        extras["sample_weight"] = gather_samples(w.float())
        return w

    def _token_weights(
        self,
        step: int,
        batch: dict[str, torch.Tensor],
        per_token: torch.Tensor,
        ref_loss: torch.Tensor | None,
        attached: bool,
        extras: dict[str, torch.Tensor],
    ) -> torch.Tensor | None:
        """Per-token weights (TLDR, PRIOR; None for the other weightings); adds each domain's
        token-weight sum and token count, summed over ranks, to what the step reports."""
        weighting = self.weighting
        if weighting is None or not getattr(weighting, "token_level", False):
            return None
        tw = weighting.token_weights(step, per_token, batch["loss_mask"], ref_loss)
        if attached:
            sums = domain_mean_weight(tw, batch["loss_mask"], batch["dataset_id"], self.num_domains)
            if _world() > 1:
                torch.distributed.all_reduce(sums)
            extras["token_weight"] = sums
        return tw

    def _loss(
        self,
        batch: dict[str, torch.Tensor],
        per_token: torch.Tensor,
        w: torch.Tensor | None,
        attached: bool,
        tw: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Any]:
        """The step's loss and statistics; detached steps skip the per-sample statistics."""
        norm = _token_normalizer(batch["loss_mask"])
        if attached:
            return self.hook(
                per_token, batch["loss_mask"], batch["dataset_id"], batch["sample_id"], w, norm, token_weights=tw
            )
        return compute_loss(
            per_token,
            batch["loss_mask"],
            batch["dataset_id"],
            self.num_domains,
            instance_weights=w,
            normalizer=norm,
            token_weights=tw,
        )

    def _update(self, step: int, loss: torch.Tensor, attached: bool, extras: dict[str, torch.Tensor]) -> None:
        """Backward, gradient all-reduce, DGA's alignment probe, clipping and the optimizer step."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _allreduce_grads(self.model)
        if self.align is not None and attached and self.align.due(step):
            # Before the update: the step's parameters, mixture and learning rate (DoGE's lr_t).
            extras.update(self.align.measure(step, self.sampler.weights, self.scheduler.get_last_lr()[0]))
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()

    def _after_step(self, done: int, attached: bool) -> None:
        """Block ends of a comparison run, periodic checkpoints and evaluations after `done` steps."""
        cfg, run = self.cfg, self.runlog
        if attached and cfg.compare_every and done % cfg.compare_every == 0:
            run.emit(self.host.flush())  # the block ends: nothing of it may leak into the next
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
            # Drain the pending report first, so every step up to the checkpoint is reported.
            run.emit(self.host.flush())
            run.result.checkpoints.append(self.checkpoint(done))
        if self.val_datasets and cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
            run.validation(done, self.evaluate())

    def _finish(self) -> TrainResult:
        """Report the last steps, save and evaluate the final state, and fill in the result."""
        cfg, run, start = self.cfg, self.runlog, self.start
        r = run.result
        if self.announced is not None:
            self.announced.close()  # every rank, at the same point: the last broadcast in flight
        run.emit(self.host.flush())
        saved_final = bool(cfg.checkpoint_every) and cfg.steps % cfg.checkpoint_every == 0
        if cfg.checkpoint_dir is not None and cfg.steps > start and not saved_final:
            r.checkpoints.append(self.checkpoint(cfg.steps))
        if self.val_datasets and cfg.steps > start:
            run.validation(cfg.steps, self.evaluate())
        self.bar.close()
        run.close()
        r.final_step = max(start, cfg.steps)
        r.applied = self.sampler.applied
        if len(r.step_times) > 2:
            r.step_time_s = float(np.median(r.step_times[2:]))
        return r

    def evaluate(self) -> np.ndarray:
        """Balanced validation of the current model (see the module function evaluate)."""
        return evaluate(self.model, self.val_datasets, self.cfg)

    def checkpoint(self, step: int) -> Path:
        """Save the state after `step` steps on rank 0 (every rank holds the same state); others wait."""
        cfg = self.cfg
        assert cfg.checkpoint_dir is not None
        folder = Path(cfg.checkpoint_dir) / f"step_{step:08d}"
        if _is_rank0():
            instance = self.weighting.state_dict() if self.weighting is not None else None
            folder = save_checkpoint(
                cfg.checkpoint_dir,
                step,
                self.model,
                self.optimizer,
                self.scheduler,
                self.sampler,
                cfg,
                instance,
            )
        if _world() > 1:
            torch.distributed.barrier()
        return folder

    def close(self) -> None:
        """Release the probes' hooks and tear the model's process groups down."""
        if self.sample_align is not None:
            self.sample_align.close()
        if self.self_influence is not None:
            self.self_influence.close()
        teardown()


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
    trainer = Trainer(
        cfg,
        datasets,
        val_datasets,
        sampler,
        attachment,
        weighting=weighting,
        target_dataset=target_dataset,
        on_step=on_step,
    )
    return trainer.run(progress)
