"""`mixer bench ...`: benchmarks that print numbers.

Each command runs one benchmark module of `mixer.bench` (service, load, replay, strategies,
weighting, sampler, quality) and prints its table, or with `--json` one JSON document as its last
line. A new benchmark is one more `@bench.command` here over a `run_...` function there.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path
from typing import Any

import click
import yaml

from mixer.bench import load as load_defaults
from mixer.bench.corpus import default_corpus
from mixer.bench.quality import run_quality
from mixer.bench.quality_config import STRATEGIES, QualityRun, check_overrides
from mixer.bench.replay import MAX_REPLAY_DOMAINS, MAX_REPLAY_REPEATS, MAX_REPLAY_STEPS
from mixer.bench.service import MAX_BENCH_SAMPLES, MAX_BENCH_SESSIONS, REPORTS
from mixer.cli.common import emit_json, json_option
from mixer.config import options

bench_db_option = click.option(
    "--db", default=None, help="database URL (default: a SQLite file in a temporary folder)"
)


@click.group()
def bench() -> None:
    """Benchmarks that print numbers."""


@bench.command("service")
@click.option(
    "--reports",
    default=REPORTS,
    show_default=True,
    type=click.IntRange(1),
    help="reports to ingest, split evenly over the sessions (at least one each)",
)
@click.option(
    "--samples",
    default=4096,
    show_default=True,
    type=click.IntRange(1, MAX_BENCH_SAMPLES),
    help="per-sample losses per report",
)
@click.option("--sessions", default=4, show_default=True, type=click.IntRange(1, MAX_BENCH_SESSIONS), help="concurrent sessions")
@bench_db_option
@json_option
def bench_service(reports: int, samples: int, sessions: int, db: str | None, as_json: bool) -> None:
    """Durable ingest, GetWeights latency and push latency against a real server on loopback."""
    from mixer.bench.service import run_service_bench

    try:
        result = run_service_bench(
            reports=reports, samples=samples, sessions=sessions, db=db, progress=not as_json
        )
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--reports") from None
    if as_json:
        emit_json(result)


@bench.command("load")
@click.option(
    "--sessions",
    default=64,
    show_default=True,
    type=click.IntRange(1, load_defaults.MAX_SESSIONS),
    help="concurrent sessions, one job each",
)
@click.option(
    "--duration",
    default=120.0,
    show_default=True,
    type=click.FloatRange(load_defaults.MIN_DURATION_S, load_defaults.MAX_DURATION_S),
    help="seconds each session streams",
)
@click.option(
    "--window",
    default=load_defaults.WINDOW,
    show_default=True,
    type=click.IntRange(1),
    help="unacknowledged reports per session",
)
@click.option(
    "--rate",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0),
    help="total reports/s offered, paced evenly over the sessions (0: full rate)",
)
@click.option(
    "--client-nice",
    default=load_defaults.CLIENT_NICE,
    show_default=True,
    type=click.IntRange(0, 19),
    help="niceness of the client processes (0: equal footing with the server)",
)
@click.option(
    "--client",
    default="aio",
    show_default=True,
    type=click.Choice(load_defaults.CLIENTS),
    help="aio: the sessions as asyncio tasks in a few processes (the least CPU taken from the server); "
    "reporter: one process per session running the Reporter (the client's own cost included)",
)
@click.option(
    "--servers",
    default="1",
    show_default=True,
    help="server processes (mixer serve --workers, PostgreSQL); a list (1,2) runs each, side by side",
)
@bench_db_option
@json_option
def bench_load(
    sessions: int,
    duration: float,
    window: int,
    rate: float,
    client_nice: int,
    client: str,
    servers: str,
    db: str | None,
    as_json: bool,
) -> None:
    """Many sessions at full rate on loopback: throughput, ack latency, memory, exact log count."""
    from mixer.bench.load import compare_servers, run_load_bench

    try:
        counts = [int(n) for n in servers.split(",")]
    except ValueError:
        raise click.BadParameter(
            f"a server count or a list of them (1,2), got {servers!r}", param_hint="--servers"
        ) from None
    kw = {
        "sessions": sessions,
        "duration": duration,
        "window": window,
        "rate": rate,
        "client_nice": client_nice,
        "client": client,
        "db": db,
        "progress": not as_json,
    }
    try:  # a value out of its range: the message names it
        if counts != [1]:
            result = compare_servers(counts, **kw)
            if as_json:
                emit_json(result)
            return
        result = run_load_bench(**kw)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if as_json:
        emit_json(result)


@bench.command("replay")
@click.option(
    "--domains",
    "K",
    default=22,
    show_default=True,
    type=click.IntRange(1, MAX_REPLAY_DOMAINS),
    help="domains of the synthetic log (the rows with a floor of 0.01 need at most 100)",
)
@click.option(
    "--steps",
    default=200_000,
    show_default=True,
    type=click.IntRange(1, MAX_REPLAY_STEPS),
    help="reports in the log, one a step (held in memory)",
)
@click.option("--update-every", default=10, show_default=True, type=click.IntRange(1), help="steps per strategy update")
@click.option(
    "--repeats",
    default=3,
    show_default=True,
    type=click.IntRange(1, MAX_REPLAY_REPEATS),
    help="timed replays per row; the best counts",
)
@click.option(
    "--profile", is_flag=True, help="add a cProfile summary to every row (always added below target)"
)
@json_option
def bench_replay(K: int, steps: int, update_every: int, repeats: int, profile: bool, as_json: bool) -> None:
    """Replay speed: Engine.ingest steps per second over an in-memory synthetic log (ODM, DoReMi)."""
    from mixer.bench.replay import bench_replay as run

    try:
        d = run(K, steps, update_every=update_every, repeats=repeats, profile=profile, progress=not as_json)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if as_json:
        emit_json(d)
        return
    click.echo(
        f"K={K}, {steps} steps, update every {update_every} steps, best of {repeats}; target {d['target_steps_per_s']:,} steps/s"
    )
    click.echo(
        f"{'strategy':<14} {'min_weight':>10} {'steps/s':>10} {'us/update':>10} {'versions':>9} {'at_floor':>9}"
    )
    for r in d["rows"]:
        click.echo(
            f"{r['strategy']:<14} {r['min_weight']:>10} {r['steps_per_s']:>10,} {r['us_per_update']:>10} "
            f"{r['versions']:>9} {r['at_floor']:>9.2f}"
        )
        for p in r.get("profile", [])[:6]:
            click.echo(f"{'':>12}{p['own_share']:>6.1%} own  {p['function']}")


@bench.command("strategies")
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
def bench_strategies(
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
        emit_json(result)


@bench.command("weighting")
@click.option("--batch", default=4096, show_default=True, type=click.IntRange(1), help="samples per batch")
@click.option(
    "--threads", default=None, type=click.IntRange(1), help="torch intra-op threads (default: torch's)"
)
@click.option("--repeats", default=50, show_default=True, type=click.IntRange(1), help="timed calls per path")
@json_option
def bench_weighting(batch: int, threads: int | None, repeats: int, as_json: bool) -> None:
    """Per-step cost of the instance-weighting paths (loss-based, topic, DWM) on this machine."""
    from mixer.bench.weighting import format_table, run_weighting_bench

    result = run_weighting_bench(batch=batch, threads=threads, repeats=repeats)
    click.echo(format_table(result))
    if as_json:
        emit_json(result)


@bench.command("sampler")
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
def bench_sampler(
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
        emit_json(result)


def _parse_sets(items: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        strategy, dot, param = key.partition(".")
        if not sep or not dot or strategy not in STRATEGIES:
            raise click.BadParameter(f"{item!r}: expected STRATEGY.PARAM=VALUE", param_hint="--set")
        out.setdefault(strategy, {})[param] = yaml.safe_load(value)
    try:
        check_overrides(out)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--set") from None
    return out


PATH = click.Path(file_okay=False, path_type=Path)


@bench.command("isolation")
@click.option(
    "--jobs", default=16, show_default=True, type=click.IntRange(1), help="ordinary jobs (ODM, 8 domains)"
)
@click.option(
    "--rate",
    default=20.0,
    show_default=True,
    type=click.FloatRange(0.1),
    help="reports/s of each ordinary job",
)
@click.option(
    "--duration", default=20.0, show_default=True, type=click.FloatRange(2), help="seconds per mode"
)
@click.option(
    "--burst",
    default=20_000,
    show_default=True,
    type=click.IntRange(1, 1_000_000),
    help="already acknowledged reports the burst session resends",
)
@click.option(
    "--heavy-domains",
    default=64,
    show_default=True,
    type=click.IntRange(2),
    help="K of the costly job (ADO, refitting every step)",
)
@click.option(
    "--window",
    default=4,
    show_default=True,
    type=click.IntRange(1),
    help="unacknowledged reports per ordinary job",
)
@click.option(
    "--mode",
    "modes",
    multiple=True,
    type=click.Choice(["alone", "heavy", "burst"]),
    help="repeatable (default: all three, in that order)",
)
@click.option(
    "--client-nice",
    default=10,
    show_default=True,
    type=click.IntRange(0, 19),
    help="niceness of the client processes",
)
@bench_db_option
@json_option
def bench_isolation(
    jobs: int,
    rate: float,
    duration: float,
    burst: int,
    heavy_domains: int,
    window: int,
    modes: tuple[str, ...],
    client_nice: int,
    db: str | None,
    as_json: bool,
) -> None:
    """Ordinary jobs' acks next to a costly job, and during a burst of resends: p50/p99, throughput."""
    from mixer.bench.isolation import MODES, run_isolation

    try:
        result = run_isolation(
            jobs=jobs,
            rate=rate,
            duration=duration,
            burst=burst,
            heavy_domains=heavy_domains,
            window=window,
            modes=modes or MODES,
            client_nice=client_nice,
            db=db,
            progress=not as_json,
        )
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if as_json:
        emit_json(result)


@bench.command("select")
@click.option(
    "--corpus",
    default=None,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="raw domains (default: the packaged minipile)",
)
@click.option("--target-domain", default=None, help="its val split is the target (default: the first domain)")
@click.option("--min-words", default=100, show_default=True, type=click.IntRange(min=0))
@click.option("--num-samples", default=1000, show_default=True, type=click.IntRange(min=1))
@click.option("--repeats", default=1, show_default=True, type=click.IntRange(min=1))
@json_option
def bench_select(
    corpus: Path | None,
    target_domain: str | None,
    min_words: int,
    num_samples: int,
    repeats: int,
    as_json: bool,
) -> None:
    """DSIR's hashing + scoring in MB/s of raw text per core, ours beside the authors' package, and memory."""
    from mixer.bench.select import format_table, run_select_bench

    try:
        r = run_select_bench(
            corpus,
            target_domain,
            min_words=min_words,
            num_samples=num_samples,
            repeats=repeats,
            progress=not as_json,
        )
    except (ValueError, RuntimeError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(format_table(r))
    if as_json:
        emit_json(r)


@bench.command("quality")
@options(QualityRun, set_option=False)
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="STRATEGY.PARAM=VALUE",
    help="override a strategy parameter, e.g. --set doremi.eta=1 (repeat)",
)
@json_option
def bench_quality(sets: tuple[str, ...], as_json: bool, **kw: Any) -> None:
    """Train a small GPT per strategy and seed through the live mixer; compare with uniform.

    Writes OUT/result.json, OUT/quality.png and OUT/table.md (final mean and worst-domain balanced
    validation loss, steps to reach uniform's final loss, paired difference from uniform, step time
    against a detached static run). `--config FILE` takes the same settings as YAML.
    """
    from mixer.agent.policy import AgentFileError, strategy_spec
    from mixer.config import ConfigError, from_options

    try:
        run = from_options(QualityRun, kw)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    agent = None
    if run.agent is not None:
        try:
            agent = strategy_spec(run.agent)["params"]
        except AgentFileError as e:
            raise click.UsageError(f"--agent {run.agent}: {e}") from None
    corpus = run.corpus or default_corpus()
    if not corpus.is_dir():
        raise click.UsageError(f"no corpus at {corpus} (installed without package data?); pass --corpus DIR")
    quiet = contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext()
    with warnings.catch_warnings(), quiet:
        warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|full scope is deprecated).*")
        result = run_quality(
            corpus=corpus,
            strategies=run.strategy_names(),
            seeds=run.seeds,
            cfg=run.model(),
            device=run.device,
            out=run.out,
            cache=run.cache_dir,
            overrides=_parse_sets(sets),
            noise_domains=run.noise_domains,
            progress=not as_json,
            command=run.command_line(corpus, sets),
            agent=agent,
        )
    click.echo(Path(result["files"]["table"]).read_text())
    if as_json:
        keep = (
            "command",
            "corpus",
            "domains",
            "control_domains",
            "strategies",
            "seeds",
            "device",
            "config",
            "machine",
            "wall_s",
            "summary",
            "attach_overhead",
            "not_run",
            "files",
        )
        emit_json({k: result[k] for k in keep})
