"""What the command modules share: the options declared once, and the printers.

An option that several commands take is declared here and only here (`json_option`, `db_option`,
`address_option`); so is the one JSON printer (`emit_json`), the weight-version table, and the
decorator that turns a command group's errors into one line (`one_line_errors`).
"""

from __future__ import annotations

import functools
import json
import logging
import warnings
from collections.abc import Callable
from typing import Any

import click

from mixer.client import DEFAULT_ADDRESS

json_option = click.option("--json", "as_json", is_flag=True, help="print one JSON document as the last line")

db_option = click.option(
    "--db",
    default="mixer.db",
    show_default=True,
    envvar="MIXER_DB",
    help="SQLite file path or database URL (postgresql://...)",
)


def address_option(fn):
    """--address plus the connection's credentials (token, TLS)."""
    for opt in reversed(
        [
            click.option(
                "--address",
                default=DEFAULT_ADDRESS,
                show_default=True,
                envvar="MIXER_ADDRESS",
                help="host:port of a mixer service",
            ),
            click.option("--token", default=None, envvar="MIXER_TOKEN", help="bearer token (mx_...)"),
            click.option(
                "--tls-ca",
                default=None,
                envvar="MIXER_TLS_CA",
                type=click.Path(exists=True, dir_okay=False),
                help="CA certificate: connect with TLS",
            ),
            click.option(
                "--tls-cert",
                "client_cert",
                default=None,
                type=click.Path(exists=True, dir_okay=False),
                help="client certificate (mutual TLS)",
            ),
            click.option(
                "--tls-key",
                "client_key",
                default=None,
                type=click.Path(exists=True, dir_okay=False),
                help="client key (mutual TLS)",
            ),
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


def rpc_errors(fn):
    """Turn gRPC errors into one clear line and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import grpc

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


def emit_json(obj: Any) -> None:
    """One JSON document on one line (arrays as lists, anything else unknown as its str)."""
    click.echo(json.dumps(obj, separators=(",", ":"), default=_json_default))


def _json_default(o: Any) -> Any:
    return o.tolist() if hasattr(o, "tolist") else str(o)


def quiet_megatron() -> None:
    """Silence megatron-core's import-time warnings about optional GPU libraries: a CLI user cannot act on them."""
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex|scope is deprecated).*")
    logging.getLogger("megatron").setLevel(logging.ERROR)


def weights_table(domains: list[str], rows: list[dict[str, Any]], limit: int | None = None) -> str:
    """Versions as a table: one row per version, one column per domain.

    With `limit`, longer histories show their first and last versions around a "... (N more)" line.
    """
    shown = rows
    if limit is not None and len(rows) > limit:
        shown = [*rows[: limit // 2], *rows[-(limit - limit // 2) :]]
    width = max(8, *(len(d) for d in domains))
    head = f"{'version':>7} {'step':>7} " + " ".join(f"{d[:width]:>{width}}" for d in domains)
    lines = [head, "-" * len(head)]
    for r in shown:
        lines.append(
            f"{r['version']:>7} {r['effective_step']:>7} "
            + " ".join(f"{w:>{width}.4f}" for w in r["weights"])
        )
    if len(shown) < len(rows):
        lines.insert(2 + limit // 2, f"{'...':>7} ({len(rows) - len(shown)} more)")
    return "\n".join(lines)


def one_line_errors(kinds: Callable[[], tuple[type[Exception], ...]]):
    """A decorator for commands: the exceptions `kinds()` returns become one clear line and exit code 1.

    `kinds` is called when the command runs, so the modules that define them are imported then,
    not when `mixer --help` loads every command group."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            caught = kinds()
            try:
                return fn(*args, **kwargs)
            except caught as e:
                raise click.ClickException(str(e)) from None

        return wrapper

    return decorate
