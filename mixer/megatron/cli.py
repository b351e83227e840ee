"""`mixer data ...` and `mixer pretrain`: the worker side on the command line.

`COMMANDS` is what the main `mixer` group mounts (mixer/cli.py: `for c in COMMANDS:
main.add_command(c)`). Megatron-core is imported only when a command runs, so `mixer --help`
stays fast.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import click
import yaml

from mixer.megatron.pretrain import pretrain

__all__ = ["COMMANDS", "data"]


def _quiet() -> None:
    # megatron-core warns at import about optional GPU libraries; a CLI user cannot act on it.
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex|scope is deprecated).*")
    logging.getLogger("megatron").setLevel(logging.ERROR)


@click.group()
def data() -> None:
    """Prepare training data: a synthetic corpus, JSONL to Megatron indexed datasets."""


@data.command("synth")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--docs-per-domain", default=400, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="print one JSON document as the last line")
def synth(out_dir: Path, seed: int, docs_per_domain: int, as_json: bool) -> None:
    """Write the synthetic corpus (arith, prose, noise, dupes) as OUT_DIR/<domain>/{train,val}.jsonl."""
    from mixer.megatron.corpus import write_synthetic_corpus

    domains = write_synthetic_corpus(out_dir, seed=seed, docs_per_domain=docs_per_domain)
    click.echo(f"wrote {len(domains)} domains ({', '.join(domains)}) to {out_dir}")
    if as_json:
        click.echo(json.dumps({"out_dir": str(out_dir), "domains": domains}))


@data.command("prepare")
@click.argument("corpus_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--spec", "spec_out", default=None, type=click.Path(dir_okay=False, path_type=Path), help="also write a job spec over the prepared domains")
@click.option("--job", default=None, help="job name for --spec (default: the corpus folder's name)")
@click.option("--strategy", default="static", show_default=True, help="strategy for --spec")
@click.option("--update-every", default=10, show_default=True, type=click.IntRange(min=1), help="cadence for --spec")
@click.option("--no-progress", is_flag=True)
@click.option("--json", "as_json", is_flag=True, help="print one JSON document as the last line")
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
    _quiet()
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
        click.echo(json.dumps(out))


COMMANDS: list[click.Command] = [data, pretrain]
