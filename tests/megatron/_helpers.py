"""Helpers for the pretraining tests: a tiny CPU run of the pretrain command, in this process."""

from __future__ import annotations

from pathlib import Path


def pretrain_args(spec: Path, *args: str, steps: int = 20) -> list[str]:
    """Command-line arguments of a tiny, quiet CPU run."""
    small = ["--steps", str(steps), "--seq-length", "32", "--global-batch-size", "8", "--lr", "3e-3"]
    return ["--spec", str(spec), *small, "--no-progress", "--eval-samples", "8", *args]


def run_pretrain_cli(spec: Path, *args: str, steps: int = 20) -> dict:
    """Run the pretrain command in this process (as `python -m mixer.megatron.pretrain` would) and return its record."""
    from mixer.cli.data import pretrain

    return pretrain.main(pretrain_args(spec, *args, steps=steps), standalone_mode=False)


def small_options(spec: Path, **kw):
    """PretrainConfig of a tiny, quiet CPU run (what pretrain_args gives on the command line)."""
    from mixer.megatron.config import PretrainConfig

    base = {
        "steps": 20,
        "seq_length": 32,
        "global_batch_size": 8,
        "lr": 3e-3,
        "eval_samples": 8,
        "progress": False,
    }
    return PretrainConfig.of(spec=spec, **{**base, **kw})
