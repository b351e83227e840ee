"""`mixer replay`, `export`, `import`, `plot`, `sweep`: offline commands over a mixer database.

They read the database directly (`--db`, the URL `mixer serve` takes), never a running service.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from mixer.cli.common import db_option, emit_json, json_option, one_line_errors, weights_table


def _store(db: str):
    from mixer.store import Store

    if "://" not in db and not Path(db).expanduser().is_file():
        raise click.ClickException(
            f"--db {db}: no such SQLite file (give the path or URL `mixer serve --db` used)"
        )
    return Store(db)


def _offline_errors() -> tuple[type[Exception], ...]:
    """Offline errors (unknown job, bad --set, bad file)."""
    from mixer.replay import ReplayError
    from mixer.spec import SpecError

    return (ReplayError, SpecError)


_errors = one_line_errors(_offline_errors)


def _a_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--as: a job name, if given, is not empty."""
    if value is not None and not value.strip():
        raise click.BadParameter("a job name is required (it was empty)")
    return value


@click.command("replay")
@click.argument("job")
@click.option(
    "--verify",
    is_flag=True,
    help="re-derive every version with the job's own strategy and compare bit for bit",
)
@click.option("--strategy", default=None, help="counterfactual: replay the same log through this strategy")
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="KEY=VALUE",
    help="override a strategy parameter (alpha=0.5), a cadence key (cadence.update_every=20), seed=...; values are YAML; "
    "the agent strategy's path=FILE sha256=HASH reads and checks that agent file, as loading a spec file does",
)
@click.option(
    "--as",
    "as_name",
    default=None,
    metavar="NEW",
    callback=_a_name,
    help="store the counterfactual as job NEW, derived from JOB",
)
@click.option("--rows", default=12, show_default=True, type=click.IntRange(1, 100_000), help="versions to print in the table")
@db_option
@json_option
@_errors
def replay(
    job: str,
    verify: bool,
    strategy: str | None,
    sets: tuple[str, ...],
    as_name: str | None,
    rows: int,
    db: str,
    as_json: bool,
) -> None:
    """Re-derive JOB's versions from its log (--verify), or derive counterfactual ones (--strategy/--set [--as NEW])."""
    from mixer import replay as rp
    from mixer.spec import JobSpec

    store = _store(db)
    try:
        if verify:
            if strategy or sets or as_name:
                raise click.UsageError(
                    "--verify replays the job's own strategy; it takes no --strategy, --set or --as"
                )
            sys.exit(0 if _verify(store, job, as_json) else 1)
        parsed = [rp.parse_set(s) for s in sets]
        spec = JobSpec.from_json(rp.get_job(store, job).spec_json)
        new = rp.derive_spec(spec, name=as_name or f"{job}-counterfactual", strategy=strategy, sets=parsed)
        rec, _, log = rp.load_log(store, job, progress=not as_json)
        result = rp.replay(new, log, progress=not as_json, total=len(log))
        original = [v for v, _ in store.versions(rec.id)]
        stored = None
        if as_name:
            _, written = rp.store_derived(store, new, job, result.versions, result.snapshot())
            stored = "stored" if written else "already stored, identical"
        d = {
            "job": job,
            "as": as_name,
            "stored": stored,
            "strategy": new.strategy.name,
            "params": new.strategy.params,
            "cadence": new.to_dict()["cadence"],
            "sets": dict(parsed),
            "reports": result.reports,
            "versions": len(result.versions),
            "seconds": round(result.seconds, 4),
            "final_weights": dict(zip(new.domain_names, result.versions[-1].weights.tolist())),
            "original_final_weights": dict(zip(spec.domain_names, original[-1].weights.tolist()))
            if original
            else None,
            "open_loop": True,
            "note": rp.OPEN_LOOP_NOTE,
        }
        if as_json:
            emit_json(d)
            return
        _print_counterfactual(job, spec, new, result, original, stored, as_name, rows)
    finally:
        store.close()


def _verify(store, job: str, as_json: bool) -> bool:
    """`replay --verify`: print (or emit as JSON) whether JOB re-derives bit for bit; whether it did."""
    from mixer import replay as rp

    res = rp.verify(store, job, progress=not as_json)
    d = res.to_dict()
    if as_json:
        emit_json(d)
        return res.ok
    if res.ok:
        click.echo(
            f"{job}: bit-exact: {res.versions_checked} versions re-derived from {res.reports} reports of {d['log_job']}'s log"
        )
        return True
    fd = res.first_divergence
    diff = fd.get("max_abs_weight_diff")
    click.echo(
        f"{job}: DIVERGES at version {fd['version']}, step {fd['step']}: {fd['reason']}"
        + (f" (max |weight difference| {diff:.3g})" if diff is not None else "")
    )
    if "stored" in fd:
        click.echo(
            f"  stored : {[round(x, 6) for x in fd['stored']]}\n  derived: {[round(x, 6) for x in fd['derived']]}"
        )
    return False


def _print_counterfactual(job, spec, new, result, original, stored, as_name, rows: int) -> None:
    """The counterfactual's versions as a table, its final weights against the original's, and where it went."""
    from mixer import replay as rp

    table_rows = [
        {"version": v.version, "effective_step": v.effective_step, "weights": v.weights.tolist()}
        for v in result.versions
    ]
    click.echo(weights_table(new.domain_names, table_rows, limit=rows))
    click.echo(
        f"{len(result.versions)} versions from {result.reports} reports of {job} with {new.strategy.name} "
        f"{json.dumps(new.strategy.params, sort_keys=True)} in {result.seconds:.2f}s"
    )
    if original:
        click.echo(
            "original final weights: "
            + " ".join(f"{d}={w:.4f}" for d, w in zip(spec.domain_names, original[-1].weights))
        )
    click.echo(f"note: {rp.OPEN_LOOP_NOTE}")
    click.echo(
        f"{stored} as job {as_name!r} (source_job={job!r})"
        if as_name
        else "not stored (give --as NEW to keep it)"
    )


@click.command("export")
@click.argument("job")
@click.option(
    "--what",
    type=click.Choice(["weights", "versions", "signals", "weighting-model"]),
    default="versions",
    show_default=True,
    help="weights: a row per version, a column per domain; versions: the same with params (importable); "
    "signals: a row per report; weighting-model: a DWM job's newest learned weighting model as safetensors "
    "(start another job from it with weighting.params.init_from: FILE)",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["parquet", "csv"]),
    default=None,
    help="default: from the -o suffix, else parquet",
)
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@db_option
@json_option
@_errors
def export(job: str, what: str, fmt: str | None, out: Path, db: str, as_json: bool) -> None:
    """Export a job's weights, versions or signals to Parquet or CSV, or its weighting model."""
    from mixer.export import export_job

    if what == "weighting-model":
        from mixer.transfer import TransferError, write_weighting_model

        store = _store(db)
        try:
            size = write_weighting_model(store, job, out)
        except TransferError as e:
            raise click.ClickException(str(e)) from None
        finally:
            store.close()
        d = {"job": job, "what": what, "bytes": size, "files": [str(out)]}
        if as_json:
            emit_json(d)
        else:
            click.echo(f"{job}: weighting model, {size} bytes -> {out}")
        return
    fmt = fmt or ("csv" if out.suffix == ".csv" else "parquet")
    store = _store(db)
    try:
        d = export_job(store, job, what, fmt, out, progress=not as_json)
    finally:
        store.close()
    if as_json:
        emit_json(d)
    else:
        click.echo(f"{job}: {d['rows']} rows x {d['columns']} columns of {what} -> {', '.join(d['files'])}")


@click.command("import")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--as",
    "as_name",
    default=None,
    metavar="NAME",
    callback=_a_name,
    help="job name in this database (default: the exported job's)",
)
@db_option
@json_option
@_errors
def import_(path: Path, as_name: str | None, db: str, as_json: bool) -> None:
    """Import an exported versions trajectory (--what versions) as a derived job."""
    from mixer.export import import_versions
    from mixer.store import Store

    store = Store(db)  # may be a new database
    try:
        d = import_versions(store, path, as_name)
    finally:
        store.close()
    if as_json:
        emit_json(d)
    else:
        state = "imported" if d["written"] else "already there, identical"
        click.echo(f"{state}: {d['versions']} versions as job {d['job']!r} (source_job={d['source_job']!r})")


@click.command("plot")
@click.argument("jobs", nargs=-1, required=True)
@click.option(
    "-o", "--output", "out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="PNG file"
)
@click.option("--bins", default=200, show_default=True, help="step bins for the loss curves")
@db_option
@json_option
@_errors
def plot(jobs: tuple[str, ...], out: Path, bins: int, db: str, as_json: bool) -> None:
    """Stacked domain weights and per-domain training loss of one or more jobs, side by side."""
    from mixer.plot import plot_jobs

    store = _store(db)
    try:
        d = plot_jobs(store, list(jobs), out, bins=bins, progress=not as_json)
    finally:
        store.close()
    if as_json:
        emit_json(d)
    else:
        click.echo(f"wrote {d['output']} ({d['bytes']} bytes): {', '.join(j['job'] for j in d['jobs'])}")


@click.command("sweep")
@click.argument("sweep_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--address", default=None, help="Ray cluster: auto or ray://HOST:PORT (default: a local Ray)")
@click.option("--num-cpus", type=int, default=None, help="CPUs for the local Ray (default: all)")
@click.option("--top", default=20, show_default=True, help="trials to print")
@db_option
@json_option
@_errors
def sweep(
    sweep_file: Path, address: str | None, num_cpus: int | None, top: int, db: str, as_json: bool
) -> None:
    """Grid or random search over strategies x hyperparameters as counterfactual replays on Ray."""
    from mixer.sweep import SweepConfig, ranked_table, run_sweep

    cfg = SweepConfig.load(sweep_file)
    store = _store(db)
    try:
        d = run_sweep(store, cfg, address=address, num_cpus=num_cpus, progress=not as_json)
    finally:
        store.close()
    if as_json:
        emit_json(d)
    else:
        click.echo(ranked_table(d, top))
        click.echo(
            f"ran {d['ran']}, skipped {d['skipped']} finished, {len(d['failed'])} failed; results in {d['results']}"
        )
        for f in d["failed"]:
            click.echo(f"  failed: {f['strategy']} {f['sets']}: {f['error']}")
        if "best_spec" in d:
            click.echo(f"best spec: {d['best_spec']} (open-loop proxy over {d['log_job']}'s log)")
    if d["failed"]:
        sys.exit(1)


COMMANDS = [replay, export, import_, plot, sweep]
