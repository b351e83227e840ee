"""`mixer bench replay`: Engine.ingest steps per second over an in-memory synthetic log.

The same pure engine that `mixer replay` runs (mixer.replay), timed without the store: ODM and
DoReMi, with and without a binding `min_weight` floor (DoReMi's online mode collapses onto the
floor, so every update runs the floor projection).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tqdm import tqdm

from mixer.engine import at_floor
from mixer.replay import replay
from mixer.signals import Report, validate_report
from mixer.spec import JobSpec


def synthetic_log(K: int, steps: int, seed: int = 0) -> list[tuple[int, Report]]:
    """Validated per-domain reports (loss, tokens, samples, excess loss), one per step, one source."""
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(256, np.full(K, 1.0 / K), size=steps).astype(np.int64)
    tokens = counts * 1024.0
    scale = np.linspace(5.0, 2.0, steps)[:, None] * rng.uniform(0.6, 1.4, K)[None, :]
    loss_sum = tokens * scale * rng.uniform(0.95, 1.05, (steps, K))
    excess = loss_sum * 0.1
    return [
        (
            s,
            validate_report(
                Report(
                    step=s,
                    source="rank0",
                    domain_loss_sum=loss_sum[s],
                    domain_token_count=tokens[s],
                    domain_sample_count=counts[s],
                    excess_loss_sum=excess[s],
                ),
                K,
            ),
        )
        for s in range(steps)
    ]


BENCH_STRATEGIES = (
    ("odm", "odm", {}),
    ("doremi", "doremi", {}),
    ("doremi-online", "doremi", {"mode": "online"}),
)
"""The replay benchmark's rows: (label, strategy, params). DoReMi's paper mode serves the prior, so
a floor below it never binds; in online mode its weights collapse onto the floor, and every update
runs the floor projection."""


MAX_REPLAY_STEPS = 5_000_000
"""Reports in the synthetic log at most (it is held in memory)."""
MAX_REPLAY_DOMAINS = 100
"""Domains at most: the rows with a floor of 0.01 need K <= 100."""
MAX_REPLAY_REPEATS = 100


def bench_replay(
    K: int = 22,
    steps: int = 200_000,
    *,
    update_every: int = 10,
    min_weights: tuple[float, ...] = (0.0, 0.01),
    repeats: int = 3,
    profile: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Engine.ingest speed over an in-memory synthetic log: steps per second for ODM and DoReMi (or static).

    One row per (strategy, min_weight): min_weight 0 is the spec default (no projection); with a
    floor > 0, `at_floor` is the share of versions with a domain on it, i.e. whose update ran the
    engine's floor projection. Best of `repeats`.
    """
    from mixer.strategies import REGISTRY

    for name, value, lo, hi in (
        ("K", K, 1, MAX_REPLAY_DOMAINS),
        ("steps", steps, 1, MAX_REPLAY_STEPS),
        ("update_every", update_every, 1, steps),
        ("repeats", repeats, 1, MAX_REPLAY_REPEATS),
    ):
        if not lo <= value <= hi:
            raise ValueError(f"{name}: must be in [{lo}, {hi}], got {value}")
    strategies = [s for s in BENCH_STRATEGIES if s[1] in REGISTRY] or [("static", "static", {})]
    target = 100_000
    rows: list[dict[str, Any]] = []
    with tqdm(
        total=1 + len(strategies) * len(min_weights) * repeats,
        desc="bench replay",
        disable=not progress,
        leave=False,
        delay=1.0,
    ) as bar:
        log = synthetic_log(K, steps)
        bar.update()
        for label, name, params in strategies:
            for floor in min_weights:
                spec = JobSpec.from_dict(
                    {
                        "name": f"bench-{name}",
                        "domains": [f"d{i}" for i in range(K)],
                        "strategy": {"name": name, "params": params},
                        "cadence": {"update_every": update_every, "min_weight": floor},
                    }
                )
                best, r = float("inf"), None
                for _ in range(repeats):
                    r = replay(spec, log)
                    best = min(best, r.seconds)
                    bar.update()
                versions = len(r.versions)
                floored = (
                    sum(bool(at_floor(v.weights, floor).any()) for v in r.versions[1:]) if floor > 0 else 0
                )
                row = {
                    "strategy": label,
                    "min_weight": floor,
                    "steps_per_s": round(steps / best),
                    "seconds": round(best, 4),
                    "versions": versions,
                    "us_per_update": round(best / max(versions - 1, 1) * 1e6, 1),
                    "at_floor": round(floored / max(versions - 1, 1), 3),
                }
                if profile or row["steps_per_s"] < target:
                    row["profile"] = _profile(spec, log[: min(steps, 50_000)])
                rows.append(row)
    return {
        "K": K,
        "steps": steps,
        "update_every": update_every,
        "repeats": repeats,
        "target_steps_per_s": target,
        "rows": rows,
        "meets_target": all(r["steps_per_s"] >= target for r in rows),
    }


def _profile(spec: JobSpec, log: list[tuple[int, Report]], top: int = 8) -> list[dict[str, Any]]:
    """Where replay time goes: the functions with the most own time (cProfile)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.runcall(replay, spec, log)
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in stats.values()) or 1.0
    rows = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    return [
        {
            "function": f"{fn}:{line}({name})".rsplit("/", 1)[-1],
            "calls": v[1],
            "own_s": round(v[2], 4),
            "own_share": round(v[2] / total, 3),
            "cum_s": round(v[3], 4),
        }
        for (fn, line, name), v in rows
    ]
