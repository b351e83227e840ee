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
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from mixer.config import check, to_dict
from mixer.megatron.config import PretrainConfig, TrainConfig

log = logging.getLogger("mixer.pretrain")

__all__ = ["PretrainConfig", "PretrainError", "run_pretrain", "val_prefix"]


class PretrainError(Exception):
    """A pretraining run cannot start or go on; the message says what to change."""


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


def _resolve(spec: Any, cfg: PretrainConfig, attached: bool) -> tuple[TrainConfig, dict[str, Any]]:
    """The train section as this job needs it, and the plan (which probes run, for the record).

    The job's strategy declares the signals it needs (mixer.strategies ... .signals) and its
    weighting what it reads; from them come the probes, their cadences (the spec's update_every
    where the user left 0), the seed (the spec's where the user gave none) and whether the run
    waits for versions (only when attached)."""
    from mixer import signals as S
    from mixer.strategies import build_strategy

    strategy = build_strategy(spec)
    needs = strategy.signals if attached else frozenset()
    every = spec.cadence.update_every
    t = cfg.train
    plan: dict[str, Any] = {"needs": sorted(needs)}
    wants_reference = S.EXCESS_LOSS in needs or spec.weighting.name == "token-reference"
    if wants_reference and t.reference is None:
        why = (
            f"strategy {spec.strategy.name!r} needs the excess loss against a reference model"
            if S.EXCESS_LOSS in needs
            else "weighting 'token-reference' weights each token by the reference model's probability of it"
        )
        raise PretrainError(
            f"{why}: pass --reference CKPT (a checkpoint of a model trained on the prior mixture, e.g. from --save)"
        )
    resolved = replace(
        t,
        seed=spec.seed if t.seed is None else t.seed,
        reference=t.reference if wants_reference else None,
        align_every=0,
        sample_align_every=0,
        strict=t.strict and attached,
        model=replace(t.model),
    )
    if wants_reference:
        plan["reference"] = t.reference
    if S.ALIGNMENT in needs:
        params = strategy.params
        resolved.align_every = plan["align_every"] = t.align_every or every
        resolved.align_target = [spec.domain_names.index(n) for n in params.get("target", [])]
        resolved.align_exclude_self = bool(params.get("exclude_self", True))
        plan["align_target"] = resolved.align_target
        plan["align_target_prefix"] = params.get("target_prefix", "")
    frozen = spec.weighting.name == "dwm" and bool(spec.weighting.params.get("frozen", False))
    if attached and (S.SAMPLE_ALIGNMENT in needs or spec.weighting.name == "dwm") and not frozen:
        resolved.sample_align_every = plan["sample_align_every"] = t.sample_align_every or every
    if S.VAL_LOSS in needs and not t.eval_every:
        resolved.eval_every = plan["eval_every"] = every
    # Topic statistics (ToReMi) and topic weighting read each sample's topics from `mixer topics build`.
    plan["topics"] = spec.strategy.name == "toremi" or spec.weighting.name == "topic"
    resolved.report_topics = plan["report_topics"] = attached and plan["topics"]
    return resolved, plan


def _connect(run: Any, spec: Any) -> None:
    """Create the job on the service (idempotent); a clear error when it is unreachable or taken."""
    import grpc

    from mixer.client import MixerClient

    with MixerClient(run.mixer, token=run.token) as client:
        try:
            client.wait_ready(run.connect_timeout)
        except grpc.FutureTimeoutError:
            raise PretrainError(
                f"mixer service at {run.mixer} not reachable within {run.connect_timeout}s "
                "(start it with `mixer serve`, or leave out --mixer to train on the prior weights)"
            ) from None
        try:
            _, created = client.create_job(spec)
        except grpc.RpcError as e:
            raise PretrainError(f"creating job {spec.name!r} on {run.mixer}: {e.details()}") from None
    log.info("job %s %s on %s", spec.name, "created" if created else "exists (same spec)", run.mixer)


def _load_spec(path: Path) -> Any:
    """The job spec, with every domain's data prefix checked."""
    from mixer.spec import JobSpec, SpecError
    from mixer.transfer import TransferError, resolve_spec_text

    try:
        spec = JobSpec.from_yaml(resolve_spec_text(Path(path).read_text(), Path(path).parent))
    except (OSError, SpecError, TransferError) as e:
        raise PretrainError(f"{path}: {e}") from None
    for i, d in enumerate(spec.domains):
        if not d.prefix:
            raise PretrainError(
                f"{path}: domains[{i}].prefix is empty; pretraining needs each domain's data prefix"
            )
        if not _exists(d.prefix):
            raise PretrainError(
                f"{path}: domains[{i}].prefix {d.prefix}: no .bin/.idx (run `mixer data prepare`)"
            )
    return spec


def run_pretrain(cfg: PretrainConfig, *, on_step=None) -> dict[str, Any]:
    """Run one pretraining job; returns a JSON-able record (per-step arrays included).

    Raises PretrainError (and mixer.config.ConfigError) with a message naming what to change."""
    import torch

    from mixer.megatron.model import init_distributed

    check(cfg)
    spec = _load_spec(cfg.run.spec)
    attached = cfg.run.mixer is not None
    train_cfg, plan = _resolve(spec, cfg, attached)
    device = train_cfg.device
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # before NCCL comes up
    init_distributed(device)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if device.startswith("cuda") and cfg.parallel.trainer == "megatron":
        return _run_core(cfg, train_cfg, spec, plan, rank, world)
    if train_cfg.global_batch_size % world:
        raise PretrainError(
            f"--global-batch-size {train_cfg.global_batch_size} is not divisible by {world} ranks"
        )
    attachment = None
    if attached and rank == 0:
        from mixer.megatron.attach import ServiceAttachment

        _connect(cfg.run, spec)
        attachment = ServiceAttachment(
            cfg.run.mixer,
            spec.name,
            cfg.run.source,
            strict=train_cfg.strict,
            strict_timeout=cfg.run.strict_timeout,
            token=cfg.run.token,
        )
    delivered = True
    cache = _index_cache(cfg.run.cache_dir, rank, world)
    try:
        result = _train_plain(cfg, train_cfg, spec, plan, attachment, Path(cache[0]), (rank, world), on_step)
    finally:
        if attachment is not None:
            delivered = attachment.close(cfg.run.flush_timeout)
            if not delivered:
                log.error(
                    "%d reports not acknowledged within %.0fs", attachment.pending, cfg.run.flush_timeout
                )
        if not cfg.run.cache_dir and rank == 0:
            shutil.rmtree(cache[0], ignore_errors=True)
    return _record(spec, cfg, train_cfg, plan, result, rank, world, delivered)


def _train_plain(
    cfg: PretrainConfig,
    train_cfg: TrainConfig,
    spec: Any,
    plan: dict[str, Any],
    attachment,
    cache: Path,
    layout: tuple[int, int],
    on_step,
):
    """Datasets, sampler and instance weighting for the plain loop, then mixer.megatron.train.train."""
    from mixer.engine import Engine
    from mixer.megatron.data import build_domain_datasets
    from mixer.megatron.instance import InstanceWeighting
    from mixer.megatron.sampler import FingerprintMismatchError, MixtureSampler
    from mixer.megatron.train import train

    (rank, world), seq, seed = layout, train_cfg.model.seq_length, train_cfg.seed
    val_prefixes = [val_prefix(d.prefix) for d in spec.domains]
    has_val = all(_exists(p) for p in val_prefixes)
    wants_val = train_cfg.eval_every or train_cfg.sample_align_every
    if wants_val and not has_val:
        missing = next(p for p in val_prefixes if not _exists(p))
        raise PretrainError(
            f"validation data {missing} (.bin/.idx) not found; see val_prefix() for the convention"
        )
    datasets = build_domain_datasets([d.prefix for d in spec.domains], seq, seed, None, cache)
    if plan["topics"]:
        from mixer.megatron.loader import with_topics
        from mixer.topics import TopicsError

        try:
            datasets = with_topics(datasets, [d.prefix for d in spec.domains])
        except TopicsError as e:
            raise PretrainError(f"{cfg.run.spec}: topic weighting needs topic labels: {e}") from None
    vals = build_domain_datasets(val_prefixes, seq, seed, None, cache) if has_val else []
    target = None
    if plan.get("align_target_prefix"):
        target = build_domain_datasets([plan["align_target_prefix"]], seq, seed, None, cache)[0]
    v0 = Engine(spec).current  # the service's version 0, derived by the same pure code
    sampler = MixtureSampler(
        spec.num_domains,
        train_cfg.global_batch_size,
        v0.weights,
        fingerprint=spec.fingerprint(),
        dp_rank=rank,
        dp_size=world,
        dataset_lengths=[len(d) for d in datasets],
        version=v0.version,
    )
    weighting = InstanceWeighting(spec, train_cfg.device)
    try:
        return train(
            train_cfg,
            datasets,
            vals,
            sampler,
            attachment=attachment,
            progress=cfg.run.progress and rank == 0,
            weighting=weighting if weighting.enabled else None,
            target_dataset=target,
            on_step=on_step,
        )
    except FingerprintMismatchError as e:
        raise PretrainError(
            f"--load {train_cfg.resume_from}: {e}".replace("force=True", "--force-resume")
        ) from None


def _index_cache(cache_dir: Path | None, rank: int, world: int) -> list[str]:
    """[folder] for megatron's sample-index cache, the same on every rank.

    megatron keys its index cache by path and settings, not contents: a fresh folder per run.
    Rank 0 builds the indices and the other ranks read them, so all need the same folder
    (on several nodes, pass --cache-dir on a shared file system)."""
    import torch

    cache = [
        str(cache_dir) if cache_dir else (tempfile.mkdtemp(prefix="mixer-index-") if rank == 0 else None)
    ]
    if world > 1:
        torch.distributed.broadcast_object_list(cache, src=0)
    return cache


def _run_core(
    cfg: PretrainConfig, t: TrainConfig, spec: Any, plan: dict[str, Any], rank: int, world: int
) -> dict[str, Any]:
    """--device cuda: megatron-core's schedules, DDP, distributed optimizer and dist_checkpointing."""
    import torch

    from mixer.megatron.core_train import train_core

    par = cfg.parallel
    probes = [k for k in ("reference", "align_every", "sample_align_every") if plan.get(k)]
    if probes or t.strict:
        raise PretrainError(
            f"the megatron-core trainer does not run {', '.join(probes) or '--strict'} yet "
            "(job strategy or options); use --trainer plain"
        )
    dp = world // (par.tensor_parallel * par.pipeline_parallel)
    if dp * par.tensor_parallel * par.pipeline_parallel != world or t.global_batch_size % (
        par.micro_batch_size * dp
    ):
        raise PretrainError(
            f"{world} ranks = tensor {par.tensor_parallel} x pipeline {par.pipeline_parallel} x data-parallel, "
            f"and --global-batch-size {t.global_batch_size} must be a multiple of --micro-batch-size "
            f"{par.micro_batch_size} x the data-parallel size"
        )
    if cfg.run.mixer is not None and rank == 0:
        _connect(cfg.run, spec)
    torch.distributed.barrier()
    cache = _index_cache(cfg.run.cache_dir, rank, world)
    try:
        # The session lives on the reporting rank (last pipeline stage); the plug-in opens it there.
        summary = train_core(
            t,
            par,
            spec,
            address=cfg.run.mixer,
            token=cfg.run.token,
            source=cfg.run.source,
            cache_dir=Path(cache[0]),
        )
    finally:
        if not cfg.run.cache_dir and rank == 0:
            shutil.rmtree(cache[0], ignore_errors=True)
    record = {
        "job": spec.name,
        "rank": rank,
        "world_size": world,
        "mixer": cfg.run.mixer,
        "trainer": "megatron",
        "config": to_dict(cfg),
        **summary,
    }
    a, d = record["step_time_attached_s"], record["step_time_detached_s"]
    record["attached_overhead"] = a / d - 1 if t.compare_every and a and d else None
    return record


def _finite(x: float) -> float | None:
    """JSON has no NaN: a figure that was not measured is null."""
    return float(x) if np.isfinite(x) else None


def _record(
    spec,
    cfg: PretrainConfig,
    train_cfg: TrainConfig,
    plan: dict[str, Any],
    result,
    rank: int,
    world: int,
    delivered: bool,
) -> dict[str, Any]:
    """The run as JSON-able data; per-step arrays (sample ids, instance weights) of the steps kept in memory."""
    attached_t, detached_t = result.median_step_time(True), result.median_step_time(False)
    return {
        "job": spec.name,
        "rank": rank,
        "world_size": world,
        "mixer": cfg.run.mixer,
        "config": to_dict(replace(cfg, train=train_cfg)),
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
        "attached_overhead": _finite(attached_t / detached_t - 1) if train_cfg.compare_every else None,
        "all_reports_acknowledged": delivered,
    }


if (
    __name__ == "__main__"
):  # `python -m mixer.megatron.pretrain ARGS` is `mixer pretrain ARGS` (mixer/cli/data.py)
    import runpy
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    sys.argv[1:1] = ["pretrain"]
    runpy.run_module("mixer.cli", run_name="__main__", alter_sys=True)
