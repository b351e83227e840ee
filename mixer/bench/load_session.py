"""What both `mixer bench load` clients share (load.py's Reporter processes, load_aio.py's
asyncio sessions): the jobs' domain count, a session's report values and the result it reports."""

from __future__ import annotations

from typing import Any

import numpy as np

K = 8
"""Domains of every benchmark job."""

LATENCY_SAMPLES = 5000
"""Latencies a session keeps in its result (evenly thinned), whichever client ran it."""


def session_values(job: str) -> tuple[list[float], list[float]]:
    """A session's per-domain loss sums (drawn once per job) and token counts (256 per domain)."""
    rng = np.random.default_rng(abs(hash(job)) % 2**32)
    return rng.uniform(1, 4, K).tolist(), [256.0] * K


def session_result(job: str, sent: int, acked: int, errors: int, latencies_s: list[float], error: str | None) -> dict[str, Any]:
    """What a client process reports of one session (the same fields for both clients)."""
    lat = np.asarray(latencies_s) * 1000
    result = {
        "job": job,
        "sent": sent,
        "acked": acked,
        "errors": errors,
        "lat_ms": lat.tolist()[:: max(1, lat.size // LATENCY_SAMPLES)],
    }
    if error:
        result["error"] = error
    return result
