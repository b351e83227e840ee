"""`mixer ...`: the command line (click).

One module per command group; what they share (options declared once, the JSON printer, the
weight table) is in `common`:

    serve.py    mixer serve, token, job, weights   (the service and what talks to it)
    offline.py  mixer replay, export, import, plot, sweep   (a database, offline)
    data.py     mixer data synth|prepare, pretrain   (the worker side)
    bench.py    mixer bench ...   (benchmarks that print numbers)
    topics.py   mixer topics build
    demo.py     mixer demo
    agent.py    mixer agent collect|train|spec   (the Data Mixing Agent)

A new command is a function in the module of its group (or a new module whose commands are added
to `main` below). Every command that prints records or figures takes `--json` and then prints one
JSON document as its last output line.
"""

from __future__ import annotations

import logging

import click
from sqlalchemy.exc import InterfaceError, OperationalError

from mixer.cli import agent, bench, data, demo, offline, serve, topics

__all__ = ["main"]

log = logging.getLogger("mixer.cli")


class _Main(click.Group):
    """The command group: a database that cannot be reached (or fails under a command), or a file
    or folder the system refuses, is an error message naming what failed, not a traceback (`-vv`
    logs the traceback too)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (OperationalError, InterfaceError) as e:
            log.debug("database error", exc_info=True)
            said = " ".join(str(e.orig if e.orig is not None else e).split())
            raise click.ClickException(f"the database failed ({type(e.orig or e).__name__}): {said[:500]}") from None
        except OSError as e:
            log.debug("system error", exc_info=True)
            where = f": {e.filename}" if e.filename is not None else ""
            raise click.ClickException(f"{e.strerror or e}{where}") from None


@click.group(cls=_Main)
@click.option("-v", "--verbose", count=True, help="more logging (-v info, -vv debug, with tracebacks)")
def main(verbose: int) -> None:
    """mixer: live data mixing for LLM pretraining."""
    logging.basicConfig(
        level=logging.WARNING - 10 * min(verbose, 2), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


for _command in (
    *serve.COMMANDS,
    *offline.COMMANDS,
    data.data,
    data.pretrain,
    bench.bench,
    topics.topics,
    demo.demo,
    agent.agent,
):
    main.add_command(_command)
