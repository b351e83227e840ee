"""Megatron-core GPT pretraining attached to a mixer service: `python -m mixer.megatron.pretrain`.

    python -m mixer.megatron.pretrain --spec job.yaml --mixer 127.0.0.1:50051 --steps 1000
    torchrun --nproc-per-node 8 -m mixer.megatron.pretrain --spec job.yaml --mixer HOST:50051 --device cuda

What it does, in order:
1. reads the job spec; rank 0 creates the job on the service (idempotent: the same spec again is
   the same job) and opens a session; without --mixer it is the static baseline: version 0 as the
   service derives it (the prior weights; a static temperature or schedule job's initial weights);
2. builds one megatron GPTDataset per domain from the spec's prefixes, and one per domain from the
   sibling validation prefix (see `val_prefix`);
3. switches on the probes the job's strategy declares (mixer.strategies ... .signals) and the
   job's instance weighting;
4. trains (mixer.megatron.train): AdamW, warmup + cosine, checkpoints with the sampler state,
   rank 0 broadcasting versions; with the service unreachable it goes on with the last weights;
5. flushes the reporter: waits (up to --flush-timeout) until the service has every report.

On the CPU it runs the tiny model in float32 (gloo); with --device cuda, bf16 through
Float16Module and NCCL, one process per GPU (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

log = logging.getLogger("mixer.pretrain")

__all__ = ["PretrainOptions", "run_pretrain", "val_prefix"]


@dataclass(kw_only=True)
class PretrainOptions:
    """Everything a pretraining run takes; the command-line options map onto these one to one."""

    spec: Path
    mixer: str | None = None
    """host:port of the mixer service; None trains on the spec's prior weights (static baseline)."""
    source: str = "rank0"
    token: str | None = None
    steps: int = 100
    global_batch_size: int = 16
    seq_length: int = 64
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    vocab_size: int = 257
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int | None = None
    seed: int | None = None
    """None: the job spec's seed."""
    device: str = "cpu"
    save: Path | None = None
    save_interval: int = 0
    load: Path | None = None
    force_resume: bool = False
    eval_interval: int = 0
    eval_samples: int = 16
    reference: Path | None = None
    align_every: int = 0
    align_samples: int = 2
    sample_align_every: int = 0
    strict: bool = False
    strict_timeout: float = 300.0
    connect_timeout: float = 30.0
    flush_timeout: float = 60.0
    cache_dir: Path | None = None
    compare_attached: int = 0
    trainer: str = "megatron"
    """On CUDA: "megatron" (megatron-core's schedules, DDP, distributed optimizer) or "plain"."""
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    micro_batch_size: int = 1
    decay_steps: int | None = None
    override_lr_schedule: bool = False
    keep_steps: int = 1024
    record: Path | None = None
    progress: bool = True


def val_prefix(train_prefix: str) -> str:
    """The validation prefix beside a training prefix.

    `mixer data prepare` (data.prepare_corpus) writes <out>/<domain>/train and <out>/<domain>/val:
    a prefix whose last component is `train` has its validation data in the sibling `val`. Any
    other prefix P (e.g. Megatron's `..._text_document`) looks for `P_val`.
    """
    head, _, last = train_prefix.rpartition("/")
    if last == "train":
        return f"{head}/val" if head else "val"
    return f"{train_prefix}_val"


def _exists(prefix: str) -> bool:
    return Path(prefix + ".bin").is_file() and Path(prefix + ".idx").is_file()


def _probe_plan(spec: Any, opts: PretrainOptions, attached: bool) -> dict[str, Any]:
    """Which probes and cadences this job needs, from its strategy's signals and its weighting."""
    from mixer import signals as S
    from mixer.strategies import build_strategy

    strategy = build_strategy(spec)
    needs = strategy.signals if attached else frozenset()
    every = spec.cadence.update_every
    plan: dict[str, Any] = {"needs": sorted(needs)}
    if S.EXCESS_LOSS in needs:
        if opts.reference is None:
            raise click.UsageError(
                f"strategy {spec.strategy.name!r} needs the excess loss against a reference model: pass "
                "--reference CKPT (a checkpoint of a model trained on the prior mixture, e.g. from --save)"
            )
        plan["reference"] = opts.reference
    if spec.weighting.name == "token-reference":  # PRIOR: token weights from the reference model
        if opts.reference is None:
            raise click.UsageError(
                "weighting 'token-reference' weights each token by the reference model's probability of it: "
                "pass --reference CKPT"
            )
        plan["reference"] = opts.reference
    if S.ALIGNMENT in needs:
        params = strategy.params
        plan["align_every"] = opts.align_every or every
        plan["align_target"] = [spec.domain_names.index(n) for n in params.get("target", [])]
        plan["align_target_prefix"] = params.get("target_prefix", "")
        plan["align_exclude_self"] = bool(params.get("exclude_self", True))
    frozen = spec.weighting.name == "dwm" and bool(spec.weighting.params.get("frozen", False))
    if attached and (S.SAMPLE_ALIGNMENT in needs or spec.weighting.name == "dwm") and not frozen:
        plan["sample_align_every"] = opts.sample_align_every or every
    if S.VAL_LOSS in needs and not opts.eval_interval:
        plan["eval_every"] = every
    # Topic statistics (ToReMi) and topic weighting read each sample's topics from `mixer topics build`.
    plan["topics"] = spec.strategy.name == "toremi" or spec.weighting.name == "topic"
    plan["report_topics"] = attached and plan["topics"]
    return plan


def _connect(opts: PretrainOptions, spec: Any) -> None:
    """Create the job on the service (idempotent); a clear error when it is unreachable or taken."""
    import grpc

    from mixer.client import MixerClient

    with MixerClient(opts.mixer, token=opts.token) as client:
        try:
            client.wait_ready(opts.connect_timeout)
        except grpc.FutureTimeoutError:
            raise click.ClickException(
                f"mixer service at {opts.mixer} not reachable within {opts.connect_timeout}s "
                "(start it with `mixer serve`, or leave out --mixer to train on the prior weights)"
            ) from None
        try:
            _, created = client.create_job(spec)
        except grpc.RpcError as e:
            raise click.ClickException(f"creating job {spec.name!r} on {opts.mixer}: {e.details()}") from None
    log.info("job %s %s on %s", spec.name, "created" if created else "exists (same spec)", opts.mixer)


def run_pretrain(opts: PretrainOptions, *, on_step=None) -> dict[str, Any]:
    """Run one pretraining job; returns a JSON-able record (per-step arrays included)."""
    import torch

    from mixer.engine import Engine
    from mixer.megatron.data import build_domain_datasets
    from mixer.megatron.instance import InstanceWeighting
    from mixer.megatron.model import ModelConfig, init_distributed
    from mixer.megatron.sampler import FingerprintMismatchError, MixtureSampler
    from mixer.megatron.train import TrainConfig, train
    from mixer.spec import JobSpec, SpecError
    from mixer.transfer import TransferError, resolve_spec_text

    try:
        spec = JobSpec.from_yaml(resolve_spec_text(Path(opts.spec).read_text(), Path(opts.spec).parent))
    except (OSError, SpecError, TransferError) as e:
        raise click.ClickException(f"{opts.spec}: {e}") from None
    for i, d in enumerate(spec.domains):
        if not d.prefix:
            raise click.ClickException(
                f"{opts.spec}: domains[{i}].prefix is empty; pretraining needs each domain's data prefix"
            )
        if not _exists(d.prefix):
            raise click.ClickException(
                f"{opts.spec}: domains[{i}].prefix {d.prefix}: no .bin/.idx (run `mixer data prepare`)"
            )
    attached = opts.mixer is not None
    plan = _probe_plan(spec, opts, attached)

    if opts.device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # before NCCL comes up
    init_distributed(opts.device)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if opts.device.startswith("cuda") and opts.trainer == "megatron":
        return _run_core(opts, spec, plan, rank, world)
    if opts.global_batch_size % world:
        raise click.ClickException(
            f"--global-batch-size {opts.global_batch_size} is not divisible by {world} ranks"
        )

    val_prefixes = [val_prefix(d.prefix) for d in spec.domains]
    has_val = all(_exists(p) for p in val_prefixes)
    wants_val = opts.eval_interval or "eval_every" in plan or "sample_align_every" in plan
    if wants_val and not has_val:
        missing = next(p for p in val_prefixes if not _exists(p))
        raise click.ClickException(
            f"validation data {missing} (.bin/.idx) not found; see val_prefix() for the convention"
        )

    attachment = None
    if attached and rank == 0:
        from mixer.megatron.attach import ServiceAttachment

        _connect(opts, spec)
        attachment = ServiceAttachment(
            opts.mixer,
            spec.name,
            opts.source,
            strict=opts.strict,
            strict_timeout=opts.strict_timeout,
            token=opts.token,
        )
    seed = spec.seed if opts.seed is None else opts.seed
    cfg = TrainConfig(
        steps=opts.steps,
        global_batch_size=opts.global_batch_size,
        lr=opts.lr,
        min_lr=opts.min_lr,
        warmup_steps=opts.warmup,
        seed=seed,
        seq_length=opts.seq_length,
        model=ModelConfig(
            num_layers=opts.layers,
            hidden_size=opts.hidden,
            num_attention_heads=opts.heads,
            seq_length=opts.seq_length,
            vocab_size=opts.vocab_size,
        ),
        eval_every=opts.eval_interval or plan.get("eval_every", 0),
        eval_samples=opts.eval_samples,
        device=opts.device,
        checkpoint_dir=opts.save,
        checkpoint_every=opts.save_interval,
        resume_from=opts.load,
        force_resume=opts.force_resume,
        reference=plan.get("reference"),
        align_every=plan.get("align_every", 0),
        align_samples=opts.align_samples,
        align_target=plan.get("align_target", []),
        align_exclude_self=plan.get("align_exclude_self", True),
        sample_align_every=plan.get("sample_align_every", 0),
        report_topics=plan["report_topics"],
        strict=opts.strict and attached,
        compare_every=opts.compare_attached,
        decay_steps=opts.decay_steps,
        override_lr_schedule=opts.override_lr_schedule,
        keep_steps=opts.keep_steps,
        record=opts.record,
    )
    weighting = InstanceWeighting(spec, opts.device)
    v0 = Engine(spec).current  # the service's version 0, derived by the same pure code
    delivered = True
    cache = _index_cache(opts, rank, world)
    try:
        datasets = build_domain_datasets(
            [d.prefix for d in spec.domains], opts.seq_length, seed, None, Path(cache[0])
        )
        if plan["topics"]:
            from mixer.megatron.loader import with_topics
            from mixer.topics import TopicsError

            try:
                datasets = with_topics(datasets, [d.prefix for d in spec.domains])
            except TopicsError as e:
                raise click.ClickException(f"{opts.spec}: topic weighting needs topic labels: {e}") from None
        vals = (
            build_domain_datasets(val_prefixes, opts.seq_length, seed, None, Path(cache[0]))
            if has_val
            else []
        )
        target = None
        if plan.get("align_target_prefix"):
            target = build_domain_datasets(
                [plan["align_target_prefix"]], opts.seq_length, seed, None, Path(cache[0])
            )[0]
        sampler = MixtureSampler(
            spec.num_domains,
            opts.global_batch_size,
            v0.weights,
            fingerprint=spec.fingerprint(),
            dp_rank=rank,
            dp_size=world,
            dataset_lengths=[len(d) for d in datasets],
            version=v0.version,
        )
        try:
            result = train(
                cfg,
                datasets,
                vals,
                sampler,
                attachment=attachment,
                progress=opts.progress and rank == 0,
                weighting=weighting if weighting.enabled else None,
                target_dataset=target,
                on_step=on_step,
            )
        except FingerprintMismatchError as e:
            raise click.ClickException(
                f"--load {opts.load}: {e}".replace("force=True", "--force-resume")
            ) from None
    finally:
        if attachment is not None:
            delivered = attachment.close(opts.flush_timeout)
            if not delivered:
                log.error("%d reports not acknowledged within %.0fs", attachment.pending, opts.flush_timeout)
        if not opts.cache_dir and rank == 0:
            shutil.rmtree(cache[0], ignore_errors=True)
    return _record(spec, opts, plan, result, rank, world, delivered)


def _index_cache(opts: PretrainOptions, rank: int, world: int) -> list[str]:
    """[folder] for megatron's sample-index cache, the same on every rank.

    megatron keys its index cache by path and settings, not contents: a fresh folder per run.
    Rank 0 builds the indices and the other ranks read them, so all need the same folder
    (on several nodes, pass --cache-dir on a shared file system)."""
    import torch

    cache = [
        str(opts.cache_dir)
        if opts.cache_dir
        else (tempfile.mkdtemp(prefix="mixer-index-") if rank == 0 else None)
    ]
    if world > 1:
        torch.distributed.broadcast_object_list(cache, src=0)
    return cache


def _run_core(
    opts: PretrainOptions, spec: Any, plan: dict[str, Any], rank: int, world: int
) -> dict[str, Any]:
    """--device cuda: megatron-core's schedules, DDP, distributed optimizer and dist_checkpointing."""
    import torch

    from mixer.megatron.core_train import CoreConfig, train_core

    probes = [k for k in ("reference", "align_every", "sample_align_every") if plan.get(k)]
    if probes or opts.strict:
        raise click.ClickException(
            f"the megatron-core trainer does not run {', '.join(probes) or '--strict'} yet "
            "(job strategy or options); use --trainer plain"
        )
    dp = world // (opts.tensor_parallel * opts.pipeline_parallel)
    if dp * opts.tensor_parallel * opts.pipeline_parallel != world or opts.global_batch_size % (
        opts.micro_batch_size * dp
    ):
        raise click.ClickException(
            f"{world} ranks = tensor {opts.tensor_parallel} x pipeline {opts.pipeline_parallel} x data-parallel, "
            f"and --global-batch-size {opts.global_batch_size} must be a multiple of --micro-batch-size "
            f"{opts.micro_batch_size} x the data-parallel size"
        )
    if opts.mixer is not None and rank == 0:
        _connect(opts, spec)
    torch.distributed.barrier()
    cfg = CoreConfig(
        steps=opts.steps,
        global_batch_size=opts.global_batch_size,
        micro_batch_size=opts.micro_batch_size,
        tensor_parallel=opts.tensor_parallel,
        pipeline_parallel=opts.pipeline_parallel,
        seq_length=opts.seq_length,
        layers=opts.layers,
        hidden=opts.hidden,
        heads=opts.heads,
        vocab_size=opts.vocab_size,
        lr=opts.lr,
        min_lr=opts.min_lr,
        warmup=opts.warmup,
        decay_steps=opts.decay_steps,
        override_lr_schedule=opts.override_lr_schedule,
        seed=spec.seed if opts.seed is None else opts.seed,
        save=opts.save,
        save_interval=opts.save_interval,
        load=opts.load,
        compare_every=opts.compare_attached,
    )
    cache = _index_cache(opts, rank, world)
    try:
        # The session lives on the reporting rank (last pipeline stage); the plug-in opens it there.
        summary = train_core(
            cfg, spec, address=opts.mixer, token=opts.token, source=opts.source, cache_dir=Path(cache[0])
        )
    finally:
        if not opts.cache_dir and rank == 0:
            shutil.rmtree(cache[0], ignore_errors=True)
    record = {
        "job": spec.name,
        "rank": rank,
        "world_size": world,
        "mixer": opts.mixer,
        "trainer": "megatron",
        **summary,
    }
    a, d = record["step_time_attached_s"], record["step_time_detached_s"]
    record["attached_overhead"] = a / d - 1 if opts.compare_attached and a and d else None
    return record


def _finite(x: float) -> float | None:
    """JSON has no NaN: a figure that was not measured is null."""
    return float(x) if np.isfinite(x) else None


def _record(
    spec, opts: PretrainOptions, plan: dict[str, Any], result, rank: int, world: int, delivered: bool
) -> dict[str, Any]:
    """The run as JSON-able data; per-step arrays (sample ids, instance weights) of the steps kept in memory."""
    attached_t, detached_t = result.median_step_time(True), result.median_step_time(False)
    return {
        "job": spec.name,
        "rank": rank,
        "world_size": world,
        "mixer": opts.mixer,
        "probes": {k: (str(v) if isinstance(v, Path) else v) for k, v in plan.items()},
        "final_step": result.final_step,
        "steps": result.steps,
        "losses": result.losses,
        "versions": result.versions,
        "applied": [list(a) for a in result.applied],
        "sample_ids": [ids.tolist() for ids in result.sample_ids],
        "local_sample_ids": result.local_sample_ids,
        "instance_weights": [
            s.extras["sample_weight"].tolist() for s in result.stats if "sample_weight" in s.extras
        ],
        "reported_steps": result.reported_steps,
        "signals": {
            k: result.signal_counts.get(k, 0) for k in ("excess_loss_sum", "alignment", "sample_align")
        },
        "val_history": [[step, np.asarray(v).tolist()] for step, v in result.val_history],
        "checkpoints": [str(c) for c in result.checkpoints],
        "step_time_s": _finite(result.step_time_s),
        "step_time_attached_s": _finite(attached_t),
        "step_time_detached_s": _finite(detached_t),
        "attached_overhead": _finite(attached_t / detached_t - 1) if opts.compare_attached else None,
        "all_reports_acknowledged": delivered,
    }


if __name__ == "__main__":  # `python -m mixer.megatron.pretrain ARGS` is `mixer pretrain ARGS` (mixer/cli/data.py)
    import runpy
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    sys.argv[1:1] = ["pretrain"]
    runpy.run_module("mixer.cli", run_name="__main__", alter_sys=True)
