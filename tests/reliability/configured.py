"""A real `mixer serve` started with options named as ServeConfig fields, and its /metrics read back."""

from __future__ import annotations

import re
import urllib.request

from mixer.bench.launch import ServerProcess


class ConfiguredServer(ServerProcess):
    """`mixer serve --field-name value ...` in a subprocess, from ServeConfig field names."""

    def __init__(self, db: str, workdir, **fields):
        args = [a for k, v in fields.items() for a in (f"--{k.replace('_', '-')}", str(v))]
        super().__init__(db, workdir, extra_args=args)


def metric_lines(srv: ServerProcess, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of a metric family on the server's /metrics: (labels, value)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.http_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    found = []
    for m in re.finditer(
        rf"^{re.escape(name)}(?:\{{(?P<labels>[^}}]*)\}})? (?P<value>\S+)$", text, re.MULTILINE
    ):
        found.append((dict(re.findall(r'(\w+)="([^"]*)"', m["labels"] or "")), float(m["value"])))
    return found
