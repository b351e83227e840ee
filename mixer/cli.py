"""`mixer ...`: the command line (click).

Every command that prints records or figures takes `--json` and then prints one JSON
document as its last output line.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import click

from mixer.bench import load as load_defaults
from mixer.client import DEFAULT_ADDRESS

def address_option(fn):
    """--address plus the connection's credentials (token, TLS)."""
    for opt in reversed(
        [
            click.option("--address", default=DEFAULT_ADDRESS, show_default=True, envvar="MIXER_ADDRESS", help="host:port of a mixer service"),
            click.option("--token", default=None, envvar="MIXER_TOKEN", help="bearer token (mx_...)"),
            click.option("--tls-ca", default=None, envvar="MIXER_TLS_CA", type=click.Path(exists=True, dir_okay=False), help="CA certificate: connect with TLS"),
            click.option("--tls-cert", "client_cert", default=None, type=click.Path(exists=True, dir_okay=False), help="client certificate (mutual TLS)"),
            click.option("--tls-key", "client_key", default=None, type=click.Path(exists=True, dir_okay=False), help="client key (mutual TLS)"),
        ]
    ):
        fn = opt(fn)
    return fn


def connect(kw: dict[str, Any]):
    """A MixerClient from the connection options (popped from a command's kwargs)."""
    from mixer.client import MixerClient, TlsConfig

    ca, cert, key = kw.pop("tls_ca"), kw.pop("client_cert"), kw.pop("client_key")
    tls = TlsConfig(ca, cert, key) if ca or cert else None
    return MixerClient(kw.pop("address"), token=kw.pop("token"), tls=tls)
json_option = click.option("--json", "as_json", is_flag=True, help="print one JSON document as the last line")


def _quiet_imports() -> None:
    # megatron-core warns at import about optional GPU libraries; a CLI user cannot act on it.
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex|scope is deprecated).*")
    logging.getLogger("megatron").setLevel(logging.ERROR)


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, separators=(",", ":"), default=_json_default))


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _rpc_errors(fn):
    """Turn gRPC errors into one clear line and exit code 1."""
    import functools

    import grpc

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        address = kwargs.get("address", "?")
        try:
            return fn(*args, **kwargs)
        except grpc.RpcError as e:
            code = e.code().name if hasattr(e, "code") else "ERROR"
            details = e.details() if hasattr(e, "details") else str(e)
            if code == "UNAVAILABLE":
                details = f"no mixer service reachable at {address} ({details}); start one with `mixer serve`"
            raise click.ClickException(f"{code}: {details}") from None

    return wrapper


@click.group()
@click.option("-v", "--verbose", count=True, help="more logging")
def main(verbose: int) -> None:
    """mixer: live data mixing for LLM pretraining."""
    logging.basicConfig(level=logging.WARNING - 10 * min(verbose, 2), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.command()
@click.option("--db", default="mixer.db", show_default=True, envvar="MIXER_DB", help="SQLite file path or database URL (postgresql://...)")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=50051, show_default=True, type=int)
@click.option("--http-port", default=9400, show_default=True, type=int, help="/metrics and /api (0: any free port)")
@click.option("--max-samples-per-report", default=1 << 20, show_default=True, type=int, help="larger reports are refused")
@click.option("--max-message-bytes", default=64 << 20, show_default=True, type=int, help="gRPC message size limit")
@click.option("--max-domains", default=100_000, show_default=True, type=int, help="domains per job")
@click.option("--max-sessions-per-job", default=1024, show_default=True, type=int)
@click.option("--hello-timeout", default=10.0, show_default=True, type=float, help="seconds a Session stream may stay open before sending hello")
@click.option("--max-pending-sessions", default=1024, show_default=True, type=int, help="Session streams at once not yet past hello and its token check; more get RESOURCE_EXHAUSTED")
@click.option("--http-timeout", default=10.0, show_default=True, type=float, help="seconds an HTTP connection has to send its request (and finish TLS)")
@click.option("--http-max-connections", default=64, show_default=True, type=int, help="HTTP connections served at once; more are answered 503")
@click.option("--auth", is_flag=True, help="require bearer tokens (mixer token create)")
@click.option("--insecure", is_flag=True, help="allow a non-loopback --host without --auth")
@click.option("--tls-cert", default=None, help="server certificate (PEM): serve TLS (gRPC, and HTTPS on --http-port)")
@click.option("--tls-key", default=None, help="server private key (PEM)")
@click.option("--tls-client-ca", default=None, help="require client certificates signed by this CA (mutual TLS)")
@click.option("--ha", is_flag=True, help="share a PostgreSQL database with other servers; jobs are owned through leases")
@click.option("--server-id", default="", help="this server's name in lease rows (default: its address)")
@click.option("--advertise", default="", help="address other servers send clients to (default: host:port)")
@click.option("--lease-ttl", default=5.0, show_default=True, type=float, help="seconds a lease outlives its owner")
def serve(**kw) -> None:
    """Run the mixer service (gRPC + HTTP metrics) until SIGTERM."""
    import asyncio

    from mixer.server.app import ServeConfig
    from mixer.server.app import serve as run

    logging.getLogger("mixer").setLevel(logging.INFO)
    asyncio.run(run(ServeConfig(**kw)))


@main.group()
def token() -> None:
    """Issue and revoke bearer tokens (written straight to the database)."""


@token.command("create")
@click.option("--job", required=True, help="the job the token is for, or '*' for every job")
@click.option("--role", required=True, type=click.Choice(["reader", "writer", "admin"]))
@click.option("--db", default="mixer.db", show_default=True, envvar="MIXER_DB")
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
@click.option("--db", default="mixer.db", show_default=True, envvar="MIXER_DB")
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


@main.group()
def job() -> None:
    """Create and inspect jobs."""


def _job_dict(j) -> dict[str, Any]:
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
        "status": j.status,
    }


@job.command("create")
@click.argument("spec_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@address_option
@json_option
@_rpc_errors
def job_create(spec_file: Path, as_json: bool, **conn) -> None:
    """Create a job from a YAML spec (idempotent by name)."""
    from mixer.spec import JobSpec, SpecError

    text = spec_file.read_text()
    try:
        JobSpec.from_yaml(text)
    except SpecError as e:
        raise click.ClickException(f"{spec_file}: {e}") from None
    with connect(conn) as c:
        j, created = c.create_job(text)
    if as_json:
        emit_json({**_job_dict(j), "created": created})
    else:
        click.echo(f"{'created' if created else 'exists (same spec)'}: {j.name} ({j.strategy}, {len(j.domains)} domains)")


@job.command("list")
@address_option
@json_option
@_rpc_errors
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
@_rpc_errors
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
@_rpc_errors
def job_finish(name: str, as_json: bool, **conn) -> None:
    """Mark a job finished: readable, but it takes no more reports."""
    with connect(conn) as c:
        j = c.finish_job(name)
    if as_json:
        emit_json(_job_dict(j))
    else:
        click.echo(f"finished: {j.name} ({j.report_count} reports, version {j.latest_version})")


def weights_table(domains: list[str], rows: list[dict[str, Any]]) -> str:
    """Versions as a table: one row per version, one column per domain."""
    width = max(8, *(len(d) for d in domains))
    head = f"{'version':>7} {'step':>7} " + " ".join(f"{d[:width]:>{width}}" for d in domains)
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['version']:>7} {r['effective_step']:>7} " + " ".join(f"{w:>{width}.4f}" for w in r["weights"]))
    return "\n".join(lines)


def _version_dict(v) -> dict[str, Any]:
    return {
        "version": v.version,
        "effective_step": v.effective_step,
        "trigger_step": v.trigger_step,
        "weights": list(v.weights),
        "params": json.loads(v.params_json) if v.params_json else {},
    }


@main.command()
@click.argument("name")
@click.option("--step", type=int, default=None, help="only the version in force at this step")
@click.option("--watch", is_flag=True, help="keep printing new versions as they are made")
@address_option
@json_option
@_rpc_errors
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


@main.command()
@click.option("--address", default=None, help="use a running service instead of starting an embedded one")
@click.option("--job", "job_name", default="demo", show_default=True)
@click.option("--steps", default=1500, show_default=True, type=int, help="training steps (about 50 ms each on 2 CPU cores)")
@click.option("--strategy", default="odm", show_default=True)
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None, help="where the corpus, data and database go (default: a temporary folder)")
@json_option
def demo(address: str | None, job_name: str, steps: int, strategy: str, workdir: Path | None, as_json: bool) -> None:
    """Train a tiny Megatron-core GPT on a synthetic corpus, attached to a mixer service."""
    _quiet_imports()
    from mixer.demo import run_demo

    result = run_demo(address=address, job=job_name, steps=steps, strategy=strategy, workdir=workdir, progress=not as_json)
    if as_json:
        emit_json(result)


@main.group()
def bench() -> None:
    """Benchmarks that print numbers."""


@bench.command("service")
@click.option("--reports", default=2000, show_default=True, type=int, help="reports to ingest")
@click.option("--samples", default=4096, show_default=True, type=int, help="per-sample losses per report")
@click.option("--sessions", default=4, show_default=True, type=int, help="concurrent sessions")
@click.option("--db", default=None, help="database URL (default: a SQLite file in a temporary folder)")
@json_option
def bench_service(reports: int, samples: int, sessions: int, db: str | None, as_json: bool) -> None:
    """Durable ingest, GetWeights latency and push latency against a real server on loopback."""
    from mixer.bench.service import run_service_bench

    result = run_service_bench(reports=reports, samples=samples, sessions=sessions, db=db, progress=not as_json)
    if as_json:
        emit_json(result)


@bench.command("load")
@click.option("--sessions", default=64, show_default=True, type=int, help="concurrent sessions, one process and one job each")
@click.option("--duration", default=120.0, show_default=True, type=float, help="seconds each session streams")
@click.option("--window", default=load_defaults.WINDOW, show_default=True, type=click.IntRange(1), help="unacknowledged reports per session")
@click.option("--rate", default=0.0, show_default=True, type=click.FloatRange(0), help="total reports/s offered, paced evenly over the sessions (0: full rate)")
@click.option("--client-nice", default=load_defaults.CLIENT_NICE, show_default=True, type=click.IntRange(0, 19), help="niceness of the client processes (0: equal footing with the server)")
@click.option("--db", default=None, help="database URL (default: a SQLite file in a temporary folder)")
@json_option
def bench_load(sessions: int, duration: float, window: int, rate: float, client_nice: int, db: str | None, as_json: bool) -> None:
    """Many sessions at full rate on loopback: throughput, ack latency, memory, exact log count."""
    from mixer.bench.load import run_load_bench

    result = run_load_bench(sessions=sessions, duration=duration, window=window, rate=rate, client_nice=client_nice, db=db, progress=not as_json)
    if as_json:
        emit_json(result)


def _mount() -> None:
    """Attach the commands that live beside their subsystems."""
    from mixer import offline_cli
    from mixer.bench import cli as bench_cli
    from mixer.megatron import cli as megatron_cli

    for cmd in megatron_cli.COMMANDS:
        main.add_command(cmd)

    for cmd in offline_cli.COMMANDS:
        if cmd.name == "replay-bench":
            bench.add_command(cmd, "replay")
        else:
            main.add_command(cmd)
    from mixer.bench.quality import quality_command

    bench.add_command(quality_command, "quality")
    groups = {"bench": bench}
    for group, cmd in bench_cli.COMMANDS:
        if group not in groups:
            groups[group] = click.Group(group, help="Label documents with topics for topic weighting (ToReMi).")
            main.add_command(groups[group])
        groups[group].add_command(cmd)


_mount()


if __name__ == "__main__":
    sys.exit(main())
