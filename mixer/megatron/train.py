"""A small, deterministic pretraining loop for a megatron-core GPTModel fed by MixtureSampler.

Step numbers are 0-based and count optimizer steps: step t is the (t+1)-th update, drawn with
sampler.next_global_batch(t); a checkpoint "at step n" holds the state after n steps, and
resuming from it runs step n next. This matches Megatron's `iteration` counter.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from tqdm import tqdm

from mixer.megatron.loss import AsyncHostCopy, HostStats, LossHook
from mixer.megatron.model import ModelConfig, build_model, teardown
from mixer.megatron.sampler import MixtureDataset, MixtureSampler

__all__ = [
    "Attachment",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "load_checkpoint",
    "save_checkpoint",
    "train",
]

log = logging.getLogger(__name__)
_CHECKPOINT_FILE = "state.pt"
_LATEST_FILE = "latest"


@runtime_checkable
class Attachment(Protocol):
    """The training loop's view of the mixing service (a session, a replay, or a test double)."""

    # Optional extra method: report_validation(step=..., domain_loss=np.ndarray[K] float64);
    # train() calls it after each balanced evaluation when the attachment has it.

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
    ) -> None:
        """Hand over what step measured; must not block training."""
        ...


@dataclass
class TrainConfig:
    """Optimisation, evaluation and checkpoint settings of one run."""

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

    def validate(self) -> None:
        """Raise ValueError on inconsistent settings."""
        self.model.validate()
        if self.steps < 0 or self.global_batch_size <= 0:
            raise ValueError("steps must be >= 0 and global_batch_size > 0")
        if self.model.seq_length != self.seq_length:
            raise ValueError(f"model.seq_length {self.model.seq_length} != seq_length {self.seq_length}")
        if not 0 < self.lr or not 0 <= self.min_lr <= self.lr:
            raise ValueError("need 0 < lr and 0 <= min_lr <= lr")
        if self.checkpoint_every and self.checkpoint_dir is None:
            raise ValueError("checkpoint_every needs checkpoint_dir")

    @property
    def warmup(self) -> int:
        """Warmup steps actually used."""
        return self.warmup_steps if self.warmup_steps is not None else max(1, self.steps // 10)


@dataclass
class TrainResult:
    """What a run measured, one entry per step it trained (from its start or resume step)."""

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    sample_ids: list[np.ndarray] = field(default_factory=list)
    stats: list[HostStats] = field(default_factory=list)
    val_history: list[tuple[int, np.ndarray]] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)
    step_time_s: float = math.nan  # median wall time of a step, first two excluded
    final_step: int = 0


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at the last step."""
    warmup = cfg.warmup
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, cfg.steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    floor = cfg.min_lr / cfg.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Move a collated batch; non_blocking only helps with pinned sources on CUDA."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _allreduce_grads(model: torch.nn.Module) -> None:
    """Average gradients over data-parallel ranks (plain torch; Megatron's DDP needs a GPU)."""
    dist = torch.distributed
    if not dist.is_initialized() or dist.get_world_size() <= 1:
        return
    world = dist.get_world_size()
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


@torch.no_grad()
def evaluate(model: torch.nn.Module, val_datasets: Sequence[Any], cfg: TrainConfig) -> np.ndarray:
    """Balanced validation: each domain's first eval_samples samples scored on their own."""
    device = torch.device(cfg.device)
    was_training = model.training
    model.eval()
    losses = np.full(len(val_datasets), np.nan)
    for d, ds in enumerate(val_datasets):
        n = min(cfg.eval_samples, len(ds))
        total = torch.zeros((), device=device, dtype=torch.float64)
        tokens = torch.zeros((), device=device, dtype=torch.float64)
        for start in range(0, n, cfg.global_batch_size):
            keys = [(d, i) for i in range(start, min(n, start + cfg.global_batch_size))]
            batch = _to_device(MixtureDataset(val_datasets).batch(keys), device)
            per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
            mask = batch["loss_mask"].to(per_token.dtype)
            total += (per_token.float() * mask).sum().double()
            tokens += mask.sum().double()
        if n:
            losses[d] = (total / tokens.clamp(min=1)).item()
    model.train(was_training)
    return losses


def save_checkpoint(
    directory: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    sampler: MixtureSampler,
    cfg: TrainConfig | None = None,
) -> Path:
    """Write <directory>/step_<step>/state.pt and point <directory>/latest at it."""
    directory = Path(directory)
    folder = directory / f"step_{step:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "sampler": sampler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        # JSON text keeps the file loadable with weights_only=True.
        "train_config": json.dumps(asdict(cfg), default=str) if cfg is not None else None,
    }
    tmp = folder / (_CHECKPOINT_FILE + ".tmp")
    torch.save(state, tmp)
    tmp.replace(folder / _CHECKPOINT_FILE)  # a crash mid-write never leaves a torn state.pt
    (directory / _LATEST_FILE).write_text(folder.name + "\n")
    return folder


def _resolve_checkpoint(path: Path) -> Path:
    """A step folder's state.pt, given that folder or a checkpoint directory with a latest file."""
    path = Path(path)
    if (path / _CHECKPOINT_FILE).is_file():
        return path / _CHECKPOINT_FILE
    if (path / _LATEST_FILE).is_file():
        return path / (path / _LATEST_FILE).read_text().strip() / _CHECKPOINT_FILE
    if path.is_file():
        return path
    raise FileNotFoundError(f"{path}: no checkpoint ({_CHECKPOINT_FILE} or {_LATEST_FILE}) found")


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    sampler: MixtureSampler,
    force: bool = False,
) -> int:
    """Restore everything save_checkpoint wrote; returns the step to run next."""
    file = _resolve_checkpoint(path)
    state = torch.load(file, map_location="cpu", weights_only=True)
    # The sampler goes first: a fingerprint mismatch must refuse before anything is modified.
    sampler.load_state_dict(state["sampler"], force=force)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    step = int(state["step"])
    if sampler.step != step:
        raise ValueError(f"{file}: sampler is at step {sampler.step}, checkpoint at step {step}")
    return step


def _is_rank0() -> bool:
    """True on the data-parallel rank that logs and writes checkpoints."""
    dist = torch.distributed
    return not dist.is_initialized() or dist.get_rank() == 0


def _checkpoint(cfg: TrainConfig, step: int, model, optimizer, scheduler, sampler) -> Path:
    """Save on rank 0 (every rank holds the same state); other ranks wait for it."""
    assert cfg.checkpoint_dir is not None
    folder = Path(cfg.checkpoint_dir) / f"step_{step:08d}"
    if _is_rank0():
        folder = save_checkpoint(cfg.checkpoint_dir, step, model, optimizer, scheduler, sampler, cfg)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()
    return folder


class _Run:
    """Per-run bookkeeping: results, reports to the attachment, progress display."""

    def __init__(self, cfg: TrainConfig, attachment: Attachment | None, bar: tqdm) -> None:
        self.cfg = cfg
        self.attachment = attachment
        self.bar = bar
        self.result = TrainResult()
        self.versions: dict[int, int] = {}

    def emit(self, stats: HostStats | None) -> None:
        """Record one finished step and report it (stats arrive one step late)."""
        if stats is None:
            return
        version = self.versions.pop(stats.step)
        r = self.result
        r.steps.append(stats.step)
        r.losses.append(stats.loss)
        r.versions.append(version)
        r.sample_ids.append(stats.sample_id)
        r.stats.append(stats)
        self.bar.set_postfix(step=stats.step, loss=f"{stats.loss:.4f}", version=version, refresh=False)
        if self.cfg.log_every and (stats.step + 1) % self.cfg.log_every == 0:
            per_domain = np.array2string(stats.domain_mean_loss(), precision=3)
            log.info(
                "step %d loss %.4f version %d domain loss %s", stats.step, stats.loss, version, per_domain
            )
        if self.attachment is not None:
            self.attachment.report(
                step=stats.step,
                applied_version=version,
                domain_loss_sum=stats.domain_loss_sum,
                domain_token_count=stats.domain_token_count,
                domain_sample_count=stats.domain_sample_count,
                sample_loss=stats.sample_loss,
                sample_domain=stats.sample_domain,
                sample_id=stats.sample_id,
            )

    def validation(self, steps_done: int, losses: np.ndarray) -> None:
        """Record a balanced validation after steps_done steps and hand it to the attachment."""
        self.result.val_history.append((steps_done, losses))
        report = getattr(self.attachment, "report_validation", None)
        if report is not None:
            report(step=steps_done, domain_loss=losses)


def train(
    cfg: TrainConfig,
    datasets: Sequence[Any],
    val_datasets: Sequence[Any],
    sampler: MixtureSampler,
    attachment: Attachment | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train up to cfg.steps (from the resume step, if any); builds and tears down the model."""
    cfg.validate()
    num_domains = len(datasets)
    if sampler.num_domains != num_domains or sampler.global_batch_size != cfg.global_batch_size:
        raise ValueError("sampler domains / global batch size do not match the datasets / config")
    if val_datasets and len(val_datasets) != num_domains:
        raise ValueError(f"{len(val_datasets)} validation sets for {num_domains} domains")
    device = torch.device(cfg.device)
    model = build_model(cfg.model, cfg.device, seed=cfg.seed)
    try:
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, cfg=cfg))
        start = 0
        if cfg.resume_from is not None:
            start = load_checkpoint(cfg.resume_from, model, optimizer, scheduler, sampler, cfg.force_resume)
        elif sampler.step != 0:
            raise ValueError(f"sampler is at step {sampler.step} but training starts at step 0")
        data = MixtureDataset(datasets)
        hook = LossHook(num_domains)
        host = AsyncHostCopy()
        show = progress and _is_rank0()
        bar = tqdm(total=cfg.steps, initial=start, desc="train", disable=not show, dynamic_ncols=True)
        run = _Run(cfg, attachment, bar)
        durations: list[float] = []
        model.train()
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            if attachment is not None:
                update = attachment.poll()
                if update is not None:
                    version, weights, effective_step = update
                    sampler.set_weights(weights, version, effective_step)
            keys = sampler.rank_slice(sampler.next_global_batch(step))
            run.versions[step] = sampler.version
            batch = _to_device(data.batch(keys), device)
            per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
            loss, stats = hook(per_token, batch["loss_mask"], batch["dataset_id"], batch["sample_id"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            _allreduce_grads(model)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            run.emit(host.push(step, stats))
            durations.append(time.perf_counter() - t0)
            bar.update(1)
            done = step + 1
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
                # Drain the pending report first, so every step up to the checkpoint is reported.
                run.emit(host.flush())
                run.result.checkpoints.append(_checkpoint(cfg, done, model, optimizer, scheduler, sampler))
            if val_datasets and cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
                run.validation(done, evaluate(model, val_datasets, cfg))
        run.emit(host.flush())
        saved_final = bool(cfg.checkpoint_every) and cfg.steps % cfg.checkpoint_every == 0
        if cfg.checkpoint_dir is not None and cfg.steps > start and not saved_final:
            run.result.checkpoints.append(_checkpoint(cfg, cfg.steps, model, optimizer, scheduler, sampler))
        if val_datasets and cfg.steps > start:
            run.validation(cfg.steps, evaluate(model, val_datasets, cfg))
        bar.close()
        run.result.final_step = max(start, cfg.steps)
        if len(durations) > 2:
            run.result.step_time_s = float(np.median(durations[2:]))
        return run.result
    finally:
        teardown()
