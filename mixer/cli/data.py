"""`mixer data ...` and `mixer pretrain`: the worker side on the command line.

Megatron-core is imported only when a command runs, so `mixer --help` stays fast.
`python -m mixer.megatron.pretrain ARGS` runs `mixer pretrain ARGS`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import yaml

from mixer.cli.common import emit_json, json_option, quiet_megatron
from mixer.config import options
from mixer.megatron.config import PretrainConfig


@click.group()
def data() -> None:
    """Prepare training data: a synthetic corpus, JSONL to Megatron indexed datasets."""


@data.command("synth")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--docs-per-domain", default=400, show_default=True, type=click.IntRange(min=1))
@json_option
def synth(out_dir: Path, seed: int, docs_per_domain: int, as_json: bool) -> None:
    """Write the synthetic corpus (arith, prose, noise, dupes) as OUT_DIR/<domain>/{train,val}.jsonl."""
    from mixer.megatron.corpus import write_synthetic_corpus

    domains = write_synthetic_corpus(out_dir, seed=seed, docs_per_domain=docs_per_domain)
    click.echo(f"wrote {len(domains)} domains ({', '.join(domains)}) to {out_dir}")
    if as_json:
        emit_json({"out_dir": str(out_dir), "domains": domains})


@data.command("select")
@click.argument(
    "raw_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path)
)
@click.option(
    "--method",
    type=click.Choice(["dsir", "random"]),
    default="dsir",
    show_default=True,
    help="dsir: importance resampling toward the target; random: a uniform draw of the same size",
)
@click.option(
    "--target",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSONL[.gz] of documents like the ones wanted",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="new folder, in `mixer data prepare`'s layout, with the report and a prior spec",
)
@click.option("--num-samples", default=None, type=click.IntRange(min=1), help="documents to select")
@click.option(
    "--fraction",
    default=None,
    type=click.FloatRange(0, 1, min_open=True),
    help="or this fraction of the eligible documents",
)
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option(
    "--min-words",
    default=100,
    show_default=True,
    type=click.IntRange(min=0),
    help="shorter raw documents are never selected",
)
@click.option(
    "--chunk-words",
    default=0,
    show_default=True,
    type=click.IntRange(min=0, max=1 << 20),
    help="cut documents into chunks of this many words and select chunks (the paper: 128, with --min-words near it); 0: whole documents",
)
@click.option(
    "--num-buckets",
    default=10000,
    show_default=True,
    type=click.IntRange(min=2),
    help="hash buckets of the n-gram features",
)
@click.option(
    "--shard-bytes",
    default=64 << 20,
    show_default=True,
    type=click.IntRange(min=4096),
    help="plain JSONL files are processed in shards of about this size",
)
@click.option(
    "--ray-address",
    default="local",
    show_default=True,
    help='"local" (a local Ray), "auto" or host:port (a cluster), "none" (this process)',
)
@click.option("--num-cpus", default=None, type=click.IntRange(min=1), help="CPUs of the local Ray")
@click.option("--job-name", default=None, help="name of the prior's job spec (default: dsir-<target stem>)")
@click.option("--prefix-root", default=None, help="data prefixes of the prior spec under this folder")
@click.option("--no-progress", is_flag=True, help="no progress bar")
@json_option
def select(
    raw_dirs: tuple[Path, ...],
    method: str,
    target: Path,
    out: Path,
    num_samples: int | None,
    fraction: float | None,
    seed: int,
    min_words: int,
    chunk_words: int,
    num_buckets: int,
    shard_bytes: int,
    ray_address: str,
    num_cpus: int | None,
    job_name: str | None,
    prefix_root: str | None,
    no_progress: bool,
    as_json: bool,
) -> None:
    """Select raw documents that match a target (DSIR, Xie et al. 2023), in `data prepare`'s layout."""
    from mixer.select import SelectError, select_dsir, summary

    try:
        report = select_dsir(
            target,
            list(raw_dirs),
            out,
            method=method,
            num_samples=num_samples,
            fraction=fraction,
            seed=seed,
            min_words=min_words,
            chunk_words=chunk_words,
            num_buckets=num_buckets,
            shard_bytes=shard_bytes,
            ray_address=None if ray_address == "none" else ray_address,
            num_cpus=num_cpus,
            job_name=job_name,
            prefix_root=prefix_root,
            progress=not (no_progress or as_json),
        )
    except SelectError as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        emit_json(report)
    else:
        click.echo(summary(report))


@data.command("prepare")
@click.argument("corpus_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--spec",
    "spec_out",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="also write a job spec over the prepared domains",
)
@click.option("--job", default=None, help="job name for --spec (default: the corpus folder's name)")
@click.option("--strategy", default="static", show_default=True, help="strategy for --spec")
@click.option(
    "--update-every", default=10, show_default=True, type=click.IntRange(min=1), help="cadence for --spec"
)
@click.option("--no-progress", is_flag=True)
@json_option
def prepare(
    corpus_dir: Path,
    out_dir: Path,
    spec_out: Path | None,
    job: str | None,
    strategy: str,
    update_every: int,
    no_progress: bool,
    as_json: bool,
) -> None:
    """Turn CORPUS_DIR/<domain>/{train,val}.jsonl[.gz] into indexed datasets under OUT_DIR/<domain>/{train,val}."""
    quiet_megatron()
    from mixer.megatron.data import CorpusError, prepare_corpus
    from mixer.spec import JobSpec, SpecError

    try:
        prefixes = prepare_corpus(corpus_dir, out_dir, progress=not no_progress)
    except CorpusError as e:
        raise click.ClickException(str(e)) from None
    for domain, splits in prefixes.items():
        click.echo(f"{domain}: {splits['train']} (val: {splits['val']})")
    out: dict[str, Any] = {"prefixes": prefixes}
    if spec_out is not None:
        raw = {
            "name": job or corpus_dir.resolve().name,
            "domains": [{"name": d, "prefix": str(Path(p["train"]).resolve())} for d, p in prefixes.items()],
            "strategy": {"name": strategy},
            "cadence": {"update_every": update_every},
        }
        try:
            spec = JobSpec.from_dict(raw)
        except SpecError as e:
            raise click.ClickException(f"job spec: {e}") from None
        spec_out.parent.mkdir(parents=True, exist_ok=True)
        spec_out.write_text(yaml.safe_dump(raw, sort_keys=False))
        click.echo(f"job spec {spec.name!r} written to {spec_out}")
        out["spec"] = str(spec_out)
    if as_json:
        emit_json(out)


@click.command("pretrain")
@options(PretrainConfig)
@click.option(
    "--result",
    "result_file",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="write the run's record (per-step arrays included) as JSON",
)
@json_option
def pretrain(result_file: Path | None, as_json: bool, **kw: Any) -> dict[str, Any]:
    """Pretrain a Megatron-core GPT on a job spec's domains, attached to a mixer service.

    Every setting is an option below, a `--set section.name=VALUE`, or a line of a `--config FILE`
    (YAML: run, train, train.model, parallel); `--result` records the resolved settings."""
    from mixer.config import ConfigError, from_options
    from mixer.megatron.pretrain import PretrainError, run_pretrain

    quiet_megatron()
    try:
        record = run_pretrain(from_options(PretrainConfig, kw))
    except (ConfigError, PretrainError) as e:
        raise click.ClickException(str(e)) from None
    if result_file is not None:
        result_file.parent.mkdir(parents=True, exist_ok=True)
        result_file.write_text(json.dumps(record))
    if record["rank"] == 0:
        summary = {
            k: v
            for k, v in record.items()
            if k not in ("steps", "losses", "versions", "sample_ids", "local_sample_ids", "instance_weights")
        }
        last = record["losses"][-1] if record["losses"] else float("nan")
        click.echo(
            f"{record['job']}: trained to step {record['final_step']}, last loss {last:.4f}, "
            f"{1000 * (record['step_time_s'] or float('nan')):.1f} ms/step, "
            f"reports acknowledged: {record['all_reports_acknowledged']}"
        )
        if record["attached_overhead"] is not None:
            click.echo(
                f"median step attached {1000 * record['step_time_attached_s']:.2f} ms, detached "
                f"{1000 * record['step_time_detached_s']:.2f} ms: overhead {100 * record['attached_overhead']:+.1f}%"
            )
        if as_json:
            emit_json(summary)
    return record
