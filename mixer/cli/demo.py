"""`mixer demo`: the uniform baseline and a strategy side by side on one machine (mixer.demo)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import numpy as np

from mixer.cli.common import emit_json, json_option, quiet_megatron, weights_table
from mixer.demo import DEFAULT_STEPS, DEFAULT_STRATEGY


@click.command()
@click.option("--address", default=None, help="use a running service instead of starting an embedded one")
@click.option("--job", "job_name", default="demo", show_default=True)
@click.option(
    "--steps",
    default=DEFAULT_STEPS,
    show_default=True,
    type=click.IntRange(1, 1_000_000),
    help="training steps of each of the two jobs",
)
@click.option(
    "--strategy",
    default=DEFAULT_STRATEGY,
    show_default=True,
    help="the strategy run next to the uniform baseline",
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="where the corpus, data and database go (default: a temporary folder)",
)
@json_option
def demo(
    address: str | None, job_name: str, steps: int, strategy: str, workdir: Path | None, as_json: bool
) -> None:
    """Train a tiny Megatron-core GPT twice, uniform and a strategy, attached to a mixer service."""
    quiet_megatron()
    from mixer.demo import run_demo
    from mixer.errors import SpecError

    try:
        result = run_demo(
            address=address,
            job=job_name,
            steps=steps,
            strategy=strategy,
            workdir=workdir,
            progress=not as_json,
        )
    except SpecError as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        emit_json(result)
    else:
        click.echo("\n".join(summary_lines(result)))


def summary_lines(result: dict[str, Any], max_rows: int = 12) -> list[str]:
    """The demo's closing report: the strategy's weights, then both runs' final validation losses."""
    domains, strategy = result["domains"], result["strategy"]
    uni, strat = result["jobs"]["uniform"], result["jobs"][strategy]
    width = max(8, *(len(d) for d in domains))
    lines = ["", f"domain weights of {strat['job']} ({len(result['versions'])} versions):"]
    lines.append(weights_table(domains, result["versions"], limit=max_rows))
    lines.append(f"{'mean':>7} {'':>7} " + " ".join(f"{w:>{width}.4f}" for w in result["mean_weights"]))
    lines += ["", "final validation loss per domain (nats/byte; lower is better):"]
    lines.append(f"{'':<10} " + " ".join(f"{d:>{width}}" for d in domains))
    for label, run in (("uniform", uni), (strategy, strat)):
        lines.append(f"{label:<10} " + " ".join(f"{x:>{width}.3f}" for x in run["final_val_loss"]))
    diff = np.asarray(strat["final_val_loss"]) - np.asarray(uni["final_val_loss"])
    lines.append(f"{'change':<10} " + " ".join(f"{x:>+{width}.3f}" for x in diff))
    lines.append(
        f"{result['steps']} steps per job in {result['seconds']:.0f}s; "
        f"reports logged {uni['reports_logged']} and {strat['reports_logged']}, "
        f"all acknowledged: {uni['all_acknowledged'] and strat['all_acknowledged']}"
    )
    return lines
