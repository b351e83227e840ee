"""The configuration of a pretraining run: one tree, from which `mixer pretrain`'s options come.

    PretrainConfig
      run:      the job spec, the service, the worker's connection and its own I/O (RunConfig)
      train:    what the training loop takes (TrainConfig), the model's shape in train.model
      parallel: the megatron-core trainer's layout on GPUs (ParallelConfig)

`mixer.config` turns the tree into command-line options (`--lr`, `--hidden-size`, ...), `--set
train.weight_decay=0.05` overrides and `--config FILE`; `mixer.megatron.pretrain.run_pretrain` takes
a PretrainConfig; `mixer.megatron.train.train` takes its `train` section unchanged. The settings the
run derives from the job spec (which probes run, the alignment targets) are marked derived: they
are filled in by `run_pretrain`, not by the user.

This module imports neither torch nor megatron, so `mixer --help` stays quick.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mixer.config import setting

__all__ = ["VOCAB_SIZE", "ModelConfig", "ParallelConfig", "PretrainConfig", "RunConfig", "TrainConfig"]

VOCAB_SIZE = 257
"""Bytes and the end-of-document token: the vocabulary of `mixer data prepare`'s byte-level data."""


@dataclass
class ModelConfig:
    """Shape of the GPT model; the defaults are the tiny CPU model."""

    num_layers: int = setting(2, min=1, aliases=("--layers",), help="transformer layers")
    hidden_size: int = setting(64, min=1, aliases=("--hidden",), help="hidden size")
    num_attention_heads: int = setting(4, min=1, aliases=("--heads",), help="attention heads")
    seq_length: int = setting(64, min=1, help="tokens per sample")
    vocab_size: int = setting(VOCAB_SIZE, min=2, help="padded vocabulary (byte-level data needs 257)")
    ffn_hidden_size: int | None = setting(None, min=1, default_text="4 x hidden size", help="MLP width")
    dropout: float = setting(0.0, min=0.0, max=1.0, help="dropout probability")

    def validate(self) -> None:
        """Raise ValueError when the shape is inconsistent (each size's range: mixer.config.check)."""
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )


@dataclass
class TrainConfig:
    """Optimisation, evaluation, probe and checkpoint settings of one run (mixer.megatron.train)."""

    steps: int = setting(20, min=0, help="optimizer steps")
    global_batch_size: int = setting(16, min=1, help="samples per step, over all data-parallel ranks")
    lr: float = setting(1e-3, gt=0.0, help="peak learning rate")
    min_lr: float = setting(1e-4, min=0.0, help="the cosine's floor")
    warmup_steps: int | None = setting(
        None, min=0, aliases=("--warmup",), default_text="a tenth of --steps", help="linear warmup steps"
    )
    decay_steps: int | None = setting(
        None, min=1, default_text="--steps", help="the cosine reaches --min-lr at this step"
    )
    override_lr_schedule: bool = setting(
        False, help="on resume, use this run's learning-rate schedule instead of the checkpoint's"
    )
    weight_decay: float = setting(0.01, min=0.0, help="AdamW weight decay")
    betas: tuple[float, float] = setting((0.9, 0.95), min=0.0, lt=1.0, help="AdamW betas")
    grad_clip: float = setting(1.0, min=0.0, help="gradient-norm clip (0: off)")
    seed: int | None = setting(
        None, min=0, default_text="the job spec's seed", help="model initialisation and data order"
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    device: str = setting("cpu", help="cpu or cuda")
    log_every: int = setting(10, min=1, help="steps between log lines")
    eval_every: int = setting(
        0,
        min=0,
        aliases=("--eval-interval",),
        help="steps between balanced validations (0: as the strategy needs, else only at the end)",
    )
    eval_samples: int = setting(16, min=1, help="validation samples per domain")
    checkpoint_dir: Path | None = setting(None, aliases=("--save",), help="checkpoint directory")
    checkpoint_every: int = setting(
        0, min=0, aliases=("--save-interval",), help="steps between checkpoints (0: only at the end)"
    )
    resume_from: Path | None = setting(
        None, exists=True, aliases=("--load",), help="resume from this checkpoint (directory or step folder)"
    )
    force_resume: bool = setting(False, help="resume a checkpoint saved for another job spec")
    reference: Path | None = setting(
        None, exists=True, help="reference model checkpoint (DoReMi's excess loss, token-reference weights)"
    )
    align_every: int = setting(0, min=0, help="DGA alignment probe cadence (0: the spec's update_every)")
    align_samples: int = setting(2, min=1, help="samples per domain and rank per alignment probe (the least)")
    align_target: list[int] = setting(default_factory=list, derived=True, help="target domains (empty: all)")
    align_exclude_self: bool = setting(True, derived=True)
    sample_align_every: int = setting(0, min=0, help="DWM probe cadence (0: the spec's update_every)")
    sample_align_samples: int = setting(8, min=1, help="validation samples per domain for the DWM probe")
    report_topics: bool = setting(False, derived=True, help="send each sample's topics with every report")
    strict: bool = setting(
        False, help="wait at each step boundary for the version in force (reproducible runs)"
    )
    compare_every: int = setting(
        0,
        min=0,
        aliases=("--compare-attached",),
        help="benchmark: alternate blocks of N steps detached / attached",
    )
    keep_steps: int = setting(
        1024, min=1, help="per-step records kept in memory (and in --result): the most recent"
    )
    record: Path | None = setting(
        None, help="append every reported step to this JSONL file (losses, sample ids, probe results)"
    )

    def validate(self) -> None:
        """Raise ValueError on inconsistent settings, naming them (each one's range: mixer.config.check)."""
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr (--min-lr) {self.min_lr} must be <= lr (--lr) {self.lr}")
        if self.checkpoint_every and self.checkpoint_dir is None:
            raise ValueError("checkpoint_every (--save-interval) needs checkpoint_dir (--save)")
        if len(self.betas) != 2:
            raise ValueError(f"betas must be two numbers, got {self.betas}")

    @property
    def warmup(self) -> int:
        """Warmup steps actually used."""
        return self.warmup_steps if self.warmup_steps is not None else max(1, self.steps // 10)


@dataclass
class RunConfig:
    """The job, the service it attaches to, and the worker's own I/O."""

    spec: Path | None = setting(None, exists=True, required=True, help="job spec (YAML; required)")
    # No MIXER_ADDRESS fallback: leaving --mixer out must mean the static baseline.
    mixer: str | None = setting(
        None, help="host:port of the mixer service (leave out: the static baseline on the prior weights)"
    )
    source: str = setting("rank0", help="name of this worker's reports")
    token: str | None = setting(None, envvar="MIXER_TOKEN", help="bearer token for the service")
    strict_timeout: float = setting(300.0, min=0.0, help="seconds --strict waits for a version")
    connect_timeout: float = setting(30.0, min=0.0, help="seconds to wait for the service at start")
    flush_timeout: float = setting(
        60.0, min=0.0, help="seconds to wait at the end for every report to be acknowledged"
    )
    cache_dir: Path | None = setting(None, help="megatron index cache (default: a fresh temporary folder)")
    progress: bool = setting(True, help="a progress bar")


@dataclass
class ParallelConfig:
    """How the megatron-core trainer lays the model out on GPUs (--device cuda)."""

    trainer: str = setting(
        "megatron",
        choices=("megatron", "plain"),
        help="with --device cuda: megatron-core's schedules, DDP and distributed optimizer, or the plain loop",
    )
    tensor_parallel: int = setting(1, min=1, help="tensor-parallel size")
    pipeline_parallel: int = setting(1, min=1, help="pipeline-parallel size")
    micro_batch_size: int = setting(
        1, min=1, help="samples per micro-batch (global batch / (micro-batch x data-parallel) micro-batches)"
    )
    num_workers: int = setting(2, min=0, help="data-loader worker processes of the megatron trainer")


@dataclass
class PretrainConfig:
    """Everything one `mixer pretrain` run takes."""

    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=100))
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> None:
        if self.train.model.vocab_size < VOCAB_SIZE:
            raise ValueError(
                f"train.model.vocab_size (--vocab-size) {self.train.model.vocab_size}: "
                f"byte-level data needs at least {VOCAB_SIZE}"
            )

    @classmethod
    def of(cls, **flat) -> PretrainConfig:
        """A checked config from leaf names or option aliases (`steps=10, hidden=32, spec=...`), for
        code that runs pretraining without a command line (the demo, the benchmarks, tests)."""
        from mixer.config import check, leaves, override

        by_name = {leaf.name: leaf.path for leaf in leaves(cls) if not leaf.setting.derived}
        for leaf in leaves(cls):
            by_name.update({a[2:].replace("-", "_"): leaf.path for a in leaf.setting.aliases})
        unknown = sorted(set(flat) - set(by_name))
        if unknown:
            from mixer.config import ConfigError

            raise ConfigError(f"unknown pretraining setting(s): {', '.join(unknown)}")
        return check(override(cls(), {by_name[k]: v for k, v in flat.items()}))
