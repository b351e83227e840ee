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

from mixer.cli import agent, bench, data, demo, offline, serve, topics

__all__ = ["main"]


@click.group()
@click.option("-v", "--verbose", count=True, help="more logging")
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
