"""`mixer agent collect|train|spec|export`: the Data Mixing Agent, learned from recorded proxy runs."""

from __future__ import annotations

from pathlib import Path

import click

from mixer.cli.common import emit_json, json_option, one_line_errors

# Bad settings, trajectory files, agent files and specs: SpecError, TrajectoryError, AgentFileError
# and TransferError are ValueErrors.
_errors = one_line_errors(lambda: (ValueError,))


@click.group()
def agent() -> None:
    """Learn a domain re-weighting policy from many short proxy runs (Data Mixing Agent)."""


@agent.command("collect")
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="folder for the trajectories (a re-run adds only the missing ones)",
)
@click.option(
    "--corpus",
    default=None,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="<domain>/{train,val}.jsonl[.gz] (default: the packaged minipile)",
)
@click.option(
    "--trajectories", default=16, show_default=True, type=click.IntRange(1), help="proxy runs in all"
)
@click.option(
    "--segments",
    default=8,
    show_default=True,
    type=click.IntRange(2),
    help="re-weighting steps per trajectory",
)
@click.option(
    "--segment-steps",
    default=10,
    show_default=True,
    type=click.IntRange(1),
    help="proxy training steps per re-weighting step",
)
@click.option(
    "--alpha0",
    default=1.0,
    show_default=True,
    type=float,
    help="Dirichlet concentration of the first distribution (1: uniform on the simplex)",
)
@click.option(
    "--kappa",
    default=10.0,
    show_default=True,
    type=float,
    help="concentration of the random walk between steps (larger: smaller moves)",
)
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0))
@click.option(
    "--preset",
    default="quick",
    show_default=True,
    type=click.Choice(["quick", "cpu", "gpu"]),
    help="the proxy model (`mixer bench quality`'s presets)",
)
@click.option(
    "--mixer",
    "mixer_address",
    default=None,
    metavar="HOST:PORT",
    help="a running mixer serve (default: one started on OUT/mixer.db)",
)
@click.option("--address", default=None, help="Ray cluster: auto or ray://HOST:PORT (default: a local Ray)")
@click.option("--num-cpus", default=None, type=click.IntRange(1), help="CPUs of the local Ray")
@click.option(
    "--cache",
    default=None,
    type=click.Path(file_okay=False, path_type=Path),
    help="prepared datasets (default: OUT/cache)",
)
@click.option(
    "--eval-samples",
    default=None,
    type=click.IntRange(1),
    help="validation windows per domain after each step (default: the preset's)",
)
@click.option(
    "--noise-domains",
    default=0,
    show_default=True,
    type=click.IntRange(0, 64),
    help="add `mixer bench quality --noise-domains N`'s unlearnable domains (noise-0, ...)",
)
@click.option("--no-progress", is_flag=True, help="no progress bar")
@json_option
@_errors
def collect(
    out: Path,
    corpus: Path | None,
    trajectories: int,
    segments: int,
    segment_steps: int,
    alpha0: float,
    kappa: float,
    seed: int,
    preset: str,
    mixer_address: str | None,
    address: str | None,
    num_cpus: int | None,
    cache: Path | None,
    eval_samples: int | None,
    noise_domains: int,
    no_progress: bool,
    as_json: bool,
) -> None:
    """Run short proxy runs along random weight trajectories, each recorded as a mixer job."""
    from dataclasses import replace

    from mixer.agent.collect import CollectConfig
    from mixer.agent.collect import collect as run_collect
    from mixer.bench.quality_config import PRESETS

    cfg = CollectConfig(
        trajectories=trajectories,
        segments=segments,
        segment_steps=segment_steps,
        alpha0=alpha0,
        kappa=kappa,
        seed=seed,
        proxy=replace(PRESETS[preset], eval_samples=eval_samples or PRESETS[preset].eval_samples),
    )
    summary = run_collect(
        out=out,
        config=cfg,
        corpus=corpus,
        cache=cache,
        mixer=mixer_address,
        address=address,
        num_cpus=num_cpus,
        progress=not (no_progress or as_json),
        noise_domains=noise_domains,
    )
    if as_json:
        emit_json(summary)
    else:
        click.echo(" ".join(f"{k}: {v}" for k, v in summary.items() if not isinstance(v, (list, dict))))
    if summary.get("failed"):
        raise SystemExit(1)


@agent.command("train")
@click.option(
    "--trajectories",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="the folder `mixer agent collect` wrote",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="folder for agent.safetensors and agent.json",
)
@click.option("--steps", default=3000, show_default=True, type=click.IntRange(1))
@click.option(
    "--bc-steps",
    default=500,
    show_default=True,
    type=click.IntRange(0),
    help="behaviour-cloning warm start steps",
)
@click.option("--batch", default=256, show_default=True, type=click.IntRange(1))
@click.option(
    "--history",
    default=2,
    show_default=True,
    type=click.IntRange(1),
    help="re-weighting steps of weights and losses in the state",
)
@click.option("--hidden", default=64, show_default=True, type=click.IntRange(1))
@click.option("--gamma", default=0.99, show_default=True, type=float)
@click.option("--alpha", default=5.0, show_default=True, type=float, help="CQL's conservative weight")
@click.option("--reward-scale", default=100.0, show_default=True, type=float)
@click.option(
    "--horizon",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help="re-weighting steps of a whole run, for the progress input (0: the trajectories')",
)
@click.option(
    "--reward-ignore",
    default="",
    metavar="DOMAIN,...",
    help="domains left out of the reward (e.g. noise-0: unscored control domains); they stay in the state",
)
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0))
@click.option("--no-progress", is_flag=True, help="no progress bar")
@json_option
@_errors
def train(
    trajectories: Path,
    out: Path,
    steps: int,
    bc_steps: int,
    batch: int,
    history: int,
    hidden: int,
    gamma: float,
    alpha: float,
    reward_scale: float,
    horizon: int,
    reward_ignore: str,
    seed: int,
    no_progress: bool,
    as_json: bool,
) -> None:
    """Train the agent offline (conservative Q-learning) on the collected trajectories."""
    from mixer.agent.train import TrainConfig
    from mixer.agent.train import train as run_train

    cfg = TrainConfig(
        steps=steps,
        bc_steps=bc_steps,
        batch=batch,
        history=history,
        hidden=hidden,
        gamma=gamma,
        alpha=alpha,
        reward_scale=reward_scale,
        horizon=horizon,
        reward_ignore=tuple(d.strip() for d in reward_ignore.split(",") if d.strip()),
        seed=seed,
    )
    card = run_train(trajectories=trajectories, out=out, config=cfg, progress=not (no_progress or as_json))
    if as_json:
        emit_json(card)
    else:
        click.echo(
            f"agent for {len(card.get('domains', []))} domains -> {out}/agent.safetensors "
            f"({card.get('wall_s', 0):.0f} s; training data {card['data']['hash'][:12]})"
        )


@agent.command("spec")
@click.argument("spec_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--agent",
    "agent_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="the folder `mixer agent train` wrote",
)
@click.option(
    "-o",
    "--output",
    "out",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="write the spec here (default: print it)",
)
@click.option(
    "--match",
    default="name",
    show_default=True,
    type=click.Choice(["name", "position"]),
    help="match the job's domains to the agent's by name, or by position (same count, other names)",
)
@click.option(
    "--horizon",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help="re-weighting steps of the whole run (0: the agent's)",
)
@click.option(
    "--by-reference",
    is_flag=True,
    help="name the agent by its file's path and sha256 only; the file's bytes join the spec when it "
    "is loaded (`mixer job create`, `mixer pretrain`), which refuses a file whose hash differs",
)
@_errors
def spec(
    spec_file: Path, agent_dir: Path, out: Path | None, match: str, horizon: int, by_reference: bool
) -> None:
    """Make a job spec's strategy the trained agent, named by the sha256 of its actor.safetensors and
    its path; the agent's bytes travel inside the spec (so a replay needs no file)."""
    import yaml

    from mixer.agent.policy import strategy_spec
    from mixer.spec import JobSpec
    from mixer.transfer import resolve_agent

    data = JobSpec.from_yaml(spec_file.read_text()).to_dict()
    data["strategy"] = strategy_spec(agent_dir, match=match, horizon=horizon)
    if by_reference:
        del data["strategy"]["params"]["model"]
    JobSpec.from_dict(resolve_agent(data))
    text = yaml.safe_dump(data, sort_keys=False)
    if out is None:
        click.echo(text.rstrip())
    else:
        out.write_text(text)
        click.echo(f"{spec_file.name} with the agent of {agent_dir} -> {out}")


@agent.command("export")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["parquet", "csv"]),
    default=None,
    help="default: from the -o suffix, else parquet",
)
@json_option
@_errors
def export(folder: Path, out: Path, fmt: str | None, as_json: bool) -> None:
    """Write the trajectories `mixer agent collect` recorded in FOLDER as one table (a row per step).

    Each trajectory is also a job in the collecting service's database (FOLDER/mixer.db when collect
    started the service): `mixer plot --db FOLDER/mixer.db JOB` draws its weights and losses."""
    from mixer.agent.records import export_trajectories

    summary = export_trajectories(folder, out, fmt)
    if as_json:
        emit_json(summary)
    else:
        click.echo(
            f"{summary['trajectories']} trajectories, {summary['rows']} steps -> {', '.join(summary['files'])}"
        )


COMMANDS = [agent]
