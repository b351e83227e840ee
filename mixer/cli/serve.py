"""`mixer serve`, `mixer token ...`, `mixer job ...`, `mixer weights`: the service and what talks to it.

`serve` and `token` work on the database (`--db`); `job` and `weights` talk to a running service
(`--address` and its credentials).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from mixer.cli.common import (
    address_option,
    connect,
    db_option,
    emit_json,
    json_option,
    rpc_errors,
    weights_table,
)
from mixer.config import options
from mixer.server.config import ServeConfig
from mixer.signals import MAX_STEP

if TYPE_CHECKING:
    from mixer.types import JobInfo, ServedVersion


@click.command()
@options(ServeConfig)
def serve(**kw) -> None:
    """Run the mixer service (gRPC + HTTP metrics) until SIGTERM.

    Every setting is an option below, a `--set name=VALUE`, or a line of a `--config FILE` (YAML)."""
    import asyncio

    from mixer.config import ConfigError, from_options
    from mixer.server.app import serve as run

    logging.getLogger("mixer").setLevel(logging.INFO)
    try:
        cfg = from_options(ServeConfig, kw)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    if cfg.workers != 1:
        from mixer.server.workers import serve_workers

        raise SystemExit(serve_workers(cfg))
    asyncio.run(run(cfg))


@click.group()
def token() -> None:
    """Issue and revoke bearer tokens (written straight to the database)."""


@token.command("create")
@click.option("--job", required=True, help="the job the token is for, or '*' for every job")
@click.option("--role", required=True, type=click.Choice(["reader", "writer", "admin"]))
@db_option
@json_option
def token_create(job: str, role: str, db: str, as_json: bool) -> None:
    """Create a token; it is printed once and stored only as a hash."""
    from mixer.server.auth import create_token
    from mixer.store import Store

    store = Store(db)
    try:
        tok = create_token(store, job, role)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    finally:
        store.close()
    if as_json:
        emit_json({"token": tok, "job": job, "role": role})
    else:
        click.echo(tok)


@token.command("revoke")
@click.argument("token_id")
@db_option
def token_revoke(token_id: str, db: str) -> None:
    """Revoke a token by its id (the part after mx_ and before the next _)."""
    from mixer.store import Store

    store = Store(db)
    try:
        if not store.revoke_token(token_id):
            raise click.ClickException(f"no token with id {token_id!r}")
    finally:
        store.close()
    click.echo(f"revoked {token_id}")


@click.group()
def job() -> None:
    """Create and inspect jobs."""


def _job_dict(j: JobInfo) -> dict[str, Any]:
    return {
        "name": j.name,
        "strategy": j.strategy,
        "weighting": j.weighting,
        "domains": list(j.domains),
        "latest_version": j.latest_version,
        "max_step": j.max_step,
        "reports": j.report_count,
        "fingerprint": j.fingerprint,
        "source_job": j.source_job or None,
        "lineage": json.loads(j.spec_json).get("lineage") if j.spec_json else None,
        "status": j.status,
    }


@job.command("create")
@click.argument("spec_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--init-from",
    "init_from",
    default=None,
    metavar="PROXY",
    help="Start from a proxy run's time-averaged served weights: a job on this server, or a file "
    "written by `mixer export --what versions|weights`. The prior (and a static job's weights) "
    "become that average; the spec records the lineage.",
)
@click.option(
    "--average",
    default="all",
    show_default=True,
    metavar="RULE",
    help="With --init-from: average over all of the proxy's steps, last:N steps, or from-step:S on.",
)
@address_option
@json_option
@rpc_errors
def job_create(spec_file: Path, init_from: str | None, average: str, as_json: bool, **conn) -> None:
    """Create a job from a YAML spec (idempotent by name)."""
    import yaml

    from mixer.spec import JobSpec, SpecError
    from mixer.transfer import TransferError, resolve_spec_text

    try:
        text = resolve_spec_text(spec_file.read_text(), spec_file.parent)
        JobSpec.from_yaml(text)
    except (SpecError, TransferError) as e:
        raise click.ClickException(f"{spec_file}: {e}") from None
    if init_from is None and average != "all":
        raise click.UsageError("--average applies only with --init-from")
    with connect(conn) as c:
        if init_from is not None:
            from mixer import handoff
            from mixer.export import ExportError

            try:
                rule = handoff.Averaging.parse(average)
                path = Path(init_from)
                is_file = path.is_file() or path.suffix in (".parquet", ".csv")
                proxy = handoff.proxy_from_file(path) if is_file else handoff.proxy_from_server(c, init_from)
                text = yaml.safe_dump(
                    handoff.apply_to_spec(yaml.safe_load(text), proxy, rule), sort_keys=False
                )
            except (handoff.HandoffError, ExportError, SpecError) as e:
                raise click.ClickException(str(e)) from None
        j, created = c.create_job(text)
    if as_json:
        emit_json({**_job_dict(j), "created": created})
    else:
        state = "created" if created else "exists (same spec)"
        click.echo(f"{state}: {j.name} ({j.strategy}, {len(j.domains)} domains)")
        lineage = json.loads(j.spec_json).get("lineage")
        if lineage:
            click.echo(
                f"prior from {lineage['source_job']} ({lineage['average']} of its steps 0..{lineage['max_step']}, "
                f"up to version {lineage['final_version']})"
            )


@job.command("list")
@address_option
@json_option
@rpc_errors
def job_list(as_json: bool, **conn) -> None:
    """List jobs."""
    with connect(conn) as c:
        jobs = [_job_dict(j) for j in c.list_jobs()]
    if as_json:
        emit_json({"jobs": jobs})
        return
    click.echo(f"{'name':<32} {'strategy':<10} {'domains':>7} {'version':>7} {'step':>8}")
    for j in jobs:
        v = "-" if j["latest_version"] < 0 else j["latest_version"]
        s = "-" if j["max_step"] < 0 else j["max_step"]
        click.echo(f"{j['name']:<32} {j['strategy']:<10} {len(j['domains']):>7} {v:>7} {s:>8}")


@job.command("show")
@click.argument("name")
@address_option
@json_option
@rpc_errors
def job_show(name: str, as_json: bool, **conn) -> None:
    """Show one job and its spec."""
    with connect(conn) as c:
        j = c.get_job(name)
    d = {**_job_dict(j), "spec": json.loads(j.spec_json)}
    if as_json:
        emit_json(d)
        return
    import yaml

    click.echo(yaml.safe_dump(d, sort_keys=False).rstrip())


@job.command("finish")
@click.argument("name")
@address_option
@json_option
@rpc_errors
def job_finish(name: str, as_json: bool, **conn) -> None:
    """Mark a job finished: readable, but it takes no more reports."""
    with connect(conn) as c:
        j = c.finish_job(name)
    if as_json:
        emit_json(_job_dict(j))
    else:
        click.echo(f"finished: {j.name} ({j.report_count} reports, version {j.latest_version})")


def _version_dict(v: ServedVersion) -> dict[str, Any]:
    from mixer.wire import version_json

    return version_json(v, v.created_at, None, full=True)


@click.command()
@click.argument("name")
@click.option("--step", type=click.IntRange(0, MAX_STEP - 1), default=None, help="only the version in force at this step")
@click.option("--watch", is_flag=True, help="keep printing new versions as they are made")
@address_option
@json_option
@rpc_errors
def weights(name: str, step: int | None, watch: bool, as_json: bool, **conn) -> None:
    """Show a job's weight versions (or the one in force at --step)."""
    with connect(conn) as c:
        domains = list(c.get_job(name).domains)
        if step is not None:
            rows = [_version_dict(c.get_weights(name, step=step))]
        else:
            rows = [_version_dict(v) for v in c.list_versions(name)]
        if as_json and not watch:
            emit_json({"job": name, "domains": domains, "versions": rows})
            return
        if not as_json:
            click.echo(weights_table(domains, rows))
        if watch:
            last = rows[-1]["version"] if rows else -1
            try:
                for v in c.watch(name, after=last):
                    d = _version_dict(v)
                    if as_json:
                        emit_json(d)
                    else:
                        click.echo(weights_table(domains, [d]).splitlines()[-1])
            except KeyboardInterrupt:
                pass


COMMANDS = [serve, token, job, weights]
