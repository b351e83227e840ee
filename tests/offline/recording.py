"""A recorded job for the offline tests: synthetic reports streamed through a real server."""

from __future__ import annotations

import numpy as np

from mixer.client import MixerClient
from mixer.reporter import Reporter
from mixer.signals import Report

DOMAINS = ["web", "code", "books", "math"]
SPEC = {
    "name": "rec",
    "domains": [{"name": d} for d in DOMAINS],
    "strategy": {"name": "odm"},
    "cadence": {"update_every": 10, "min_weight": 0.02, "snapshot_every": 5},
}


def synthetic_report(step: int, source: str, rng: np.random.Generator) -> Report:
    """Losses fall at different rates per domain; per-sample losses, excess loss and an extra scalar."""
    base = np.array([2.0, 2.5, 3.0, 5.0]) * (1.0 + 1.5 / (1.0 + step / 40.0))
    counts = rng.multinomial(16, [0.25] * 4)
    dom = np.repeat(np.arange(4), counts)
    losses = rng.normal(base[dom], 0.1).clip(0.01).astype(np.float32)
    per_domain = np.zeros(4)
    np.add.at(per_domain, dom, losses.astype(np.float64) * 64.0)
    return Report(
        step=step,
        source=source,
        domain_loss_sum=per_domain,
        domain_token_count=counts * 64.0,
        domain_sample_count=counts.astype(np.int64),
        excess_loss_sum=per_domain * 0.1,
        sample_loss=losses,
        sample_domain=dom.astype(np.int32),
        sample_id=(np.arange(dom.size) + step * 100).astype(np.int64),
        extra={"lr": 1e-3 / (1 + step)},
    )


def record(address: str, spec: dict, steps: int, sources: int = 2) -> None:
    """Create the job and stream `steps` reports from each source through Reporters until acknowledged."""
    with MixerClient(address) as c:
        c.create_job(spec)
    reporters = [Reporter(address, spec["name"], f"rank{i}").start() for i in range(sources)]
    rngs = [np.random.default_rng(i) for i in range(sources)]
    for step in range(steps):
        for i, rep in enumerate(reporters):
            r = synthetic_report(step, rep.source, rngs[i])
            r.applied_version = rep.current.version if rep.current else -1
            rep.submit(r)
    for rep in reporters:
        assert rep.close(timeout=60), f"{rep.source}: reports never acknowledged"
        assert not rep.rejected, rep.rejected[:3]
