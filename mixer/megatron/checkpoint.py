"""Training checkpoints: model, optimizer, LR schedule, RNG, sampler state and instance weighting.

Layout: <dir>/step_<8 digits>/state.pt, and <dir>/latest naming the newest step folder. A file
is written under a temporary name and renamed, so a crash never leaves a torn state.pt. Everything
in it loads with torch.load(weights_only=True): configs travel as JSON text, blobs as uint8 tensors.
Rank 0 writes (every data-parallel rank holds the same state); the others wait at a barrier.
load_reference builds a frozen model from such a checkpoint (DoReMi's reference model).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from mixer.megatron.model import ModelConfig, build_gpt
from mixer.megatron.sampler import MixtureSampler

__all__ = [
    "CHECKPOINT_FILE",
    "LATEST_FILE",
    "load_checkpoint",
    "load_reference",
    "read_checkpoint",
    "resolve_checkpoint",
    "save_checkpoint",
]

CHECKPOINT_FILE = "state.pt"
LATEST_FILE = "latest"


def save_checkpoint(
    directory: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    sampler: MixtureSampler,
    cfg: Any = None,
    instance: dict[str, Any] | None = None,
) -> Path:
    """Write <directory>/step_<step>/state.pt and point <directory>/latest at it."""
    directory = Path(directory)
    folder = directory / f"step_{step:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        # Float16Module.state_dict() delegates to the GPTModel, so CPU and GPU checkpoints share keys.
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "sampler": sampler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "train_config": json.dumps(asdict(cfg), default=str) if cfg is not None else None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_rng"] = torch.cuda.get_rng_state()
    if instance is not None:
        state["instance_weighting"] = instance
    tmp = folder / (CHECKPOINT_FILE + ".tmp")
    torch.save(state, tmp)
    tmp.replace(folder / CHECKPOINT_FILE)
    (directory / LATEST_FILE).write_text(folder.name + "\n")
    return folder


def resolve_checkpoint(path: Path) -> Path:
    """A step folder's state.pt, given that folder, a checkpoint directory with a latest file, or the file."""
    path = Path(path)
    if (path / CHECKPOINT_FILE).is_file():
        return path / CHECKPOINT_FILE
    if (path / LATEST_FILE).is_file():
        return path / (path / LATEST_FILE).read_text().strip() / CHECKPOINT_FILE
    if path.is_file():
        return path
    raise FileNotFoundError(
        f"{path}: no checkpoint here (expected a step folder with {CHECKPOINT_FILE}, "
        f"or a checkpoint directory with a {LATEST_FILE} file)"
    )


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The raw state of a checkpoint, on the CPU."""
    return torch.load(resolve_checkpoint(path), map_location="cpu", weights_only=True)


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    sampler: MixtureSampler,
    force: bool = False,
    instance: Any = None,
) -> int:
    """Restore everything save_checkpoint wrote; returns the step to run next."""
    file = resolve_checkpoint(path)
    state = torch.load(file, map_location="cpu", weights_only=True)
    # The sampler goes first: a fingerprint mismatch must refuse before anything is modified.
    sampler.load_state_dict(state["sampler"], force=force)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"])
    if instance is not None and "instance_weighting" in state:
        instance.load_state_dict(state["instance_weighting"])
    step = int(state["step"])
    if sampler.step != step:
        raise ValueError(f"{file}: sampler is at step {sampler.step}, checkpoint at step {step}")
    return step


def load_reference(path: Path, model: ModelConfig, device: str) -> torch.nn.Module:
    """A frozen reference GPTModel from a checkpoint of this trainer (its own shape; `model` is the trained one's)."""
    state = read_checkpoint(path)
    if not state.get("train_config"):
        raise ValueError(
            f"{path}: checkpoint carries no train_config; cannot tell the reference model's shape"
        )
    ref_cfg = ModelConfig(**json.loads(state["train_config"])["model"])
    if ref_cfg.vocab_size != model.vocab_size or ref_cfg.seq_length < model.seq_length:
        raise ValueError(
            f"{path}: reference model has vocab {ref_cfg.vocab_size} and sequence length {ref_cfg.seq_length}; "
            f"training needs vocab {model.vocab_size} and sequence length >= {model.seq_length}"
        )
    # Building draws from the global RNG; fork it so the trained model's run stays reproducible.
    with torch.random.fork_rng(devices=[]):
        ref = build_gpt(ref_cfg, device)
    ref.load_state_dict(state["model"])
    return ref.eval().requires_grad_(False)
