"""`mixer bench isolation`: do ordinary jobs keep their acknowledgement latency next to a costly one?

Starts a real `mixer serve` (SQLite in a temporary folder unless `db` is given) once per mode, and
`jobs` ordinary jobs (ODM, K=8, one window of 10 steps per update) whose client processes each
report at a fixed rate through a Reporter, as training jobs do (one report per step). The modes:

- `alone`: the ordinary jobs only, the reference;
- `heavy`: beside them, one job whose every report closes a window with a costly strategy update
  (ADO at K=64 refitting its scaling laws at every step: 150-400 ms per update on one core),
  streamed at full rate with one report in flight;
- `burst`: beside them, one session that re-sends `burst` reports the service has already
  acknowledged (a worker resuming from an old checkpoint), all at once.

Per mode it prints the ordinary jobs' acknowledgement p50/p99 (client side, from when a report was
due: a client held back still counts its wait) and their throughput, and for `heavy` the updates
the costly job completed, for `burst` how long the re-sent reports took to be answered. The
targets: ordinary p99 <= 50 ms, ordinary throughput within 10% of `alone`.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mixer.bench.load import CLIENT_NICE, _session_worker
from mixer.bench.load_session import K

HEAVY_DOMAINS = 64
HEAVY_SPEC_PARAMS = {"refit_every": 1, "warmup_steps": 0, "point_every": 1}
"""ADO refits every step from the first on (its defaults wait 1000 steps and refit every 1000)."""
MODES = ("alone", "heavy", "burst")


def _heavy_reports(k: int, n: int, source: str) -> list:
    from mixer.v1 import mixer_pb2 as pb

    rng = np.random.default_rng(7)
    tokens = [256.0] * k
    out = []
    for step in range(n):
        loss = 256.0 * (3.0 * (step + 1) ** -0.2 + rng.uniform(0.0, 0.1, k))
        out.append(
            pb.Signals(
                step=step,
                source=source,
                domain_loss_sum=loss.tolist(),
                domain_token_count=tokens,
                domain_sample_count=[4] * k,
            )
        )
    return out


def _heavy_worker(address: str, job: str, k: int, duration: float, go, out: mp.Queue) -> None:
    """The costly job: one report in flight, the next as soon as it is acknowledged."""
    from mixer.reporter import Reporter

    reports = _heavy_reports(k, 100_000, "heavy")
    reporter = Reporter(address, job, "heavy", max_buffer=4).start()
    reporter.connected.wait(60)
    out.put({"ready": job})
    go.wait(300)
    time.sleep(1.0)  # the ordinary jobs are streaming before it starts
    lat: list[float] = []
    end = time.time() + duration - 1.0
    step = 0
    while time.time() < end and step < len(reports):
        t = time.perf_counter()
        reporter.submit(reports[step])
        reporter.wait_pending(0, timeout=max(0.1, end - time.time() + 30))
        lat.append(time.perf_counter() - t)
        step += 1
    reporter.close(timeout=60)
    out.put({"heavy": job, "updates": step, "ack_ms": (np.asarray(lat) * 1000).tolist()})


def _burst_worker(address: str, job: str, n: int, go, out: mp.Queue) -> None:
    """Report `n` reports (before the clock), then, once the clock runs, re-send them all at once."""
    from mixer.reporter import Reporter
    from mixer.v1 import mixer_pb2 as pb

    loss, tokens = [2.0] * K, [256.0] * K
    reports = [
        pb.Signals(step=s, source="burst", domain_loss_sum=loss, domain_token_count=tokens) for s in range(n)
    ]
    first = Reporter(address, job, "burst", max_buffer=n + 1).start()
    for r in reports:
        first.submit(r)
    first.close(timeout=600)
    out.put({"ready": job})
    go.wait(300)
    time.sleep(1.0)
    again = Reporter(address, job, "burst", max_buffer=n + 1).start()
    again.connected.wait(60)
    t = time.perf_counter()
    for r in reports:
        again.submit(r)
    again.close(timeout=600)
    out.put({"burst": job, "resent": n, "duplicates": again.duplicates, "seconds": time.perf_counter() - t})


def _mode(
    mode: str,
    *,
    jobs: int,
    rate: float,
    duration: float,
    burst: int,
    heavy_domains: int,
    window: int,
    client_nice: int,
    db: str | None,
    progress: bool,
) -> dict[str, Any]:
    from mixer.bench.launch import ServerProcess

    with tempfile.TemporaryDirectory(prefix="mixer-isolation-") as tmp:
        db_url = db or str(Path(tmp) / "isolation.db")
        srv = ServerProcess(db_url, Path(tmp)).start()
        try:
            stamp = f"{int(time.time())}-{mode}"
            names = [f"iso-{stamp}-{i}" for i in range(jobs)]
            extra = f"iso-{stamp}-{mode}"
            _create_jobs(srv.address, mode, names, extra, heavy_domains)
            ctx = mp.get_context("spawn")
            out: mp.Queue = ctx.Queue()
            go = ctx.Event()
            procs = _workers(
                ctx,
                srv.address,
                mode,
                names,
                extra,
                go,
                out,
                duration=duration,
                window=window,
                rate=rate,
                client_nice=client_nice,
                heavy_domains=heavy_domains,
                burst=burst,
            )
            for p in procs:
                p.start()
            results = _wait_ready(out, len(procs))
            go.set()
            for _ in tqdm(
                range(int(duration)),
                desc=f"{mode}: {jobs} jobs x {duration:.0f}s",
                unit="s",
                disable=not progress,
            ):
                time.sleep(1.0)
            other = _collect(out, results, jobs, wait_other=mode != "alone")
            for p in procs:
                p.join(5)
                if p.is_alive():
                    p.kill()
        finally:
            srv.terminate()
    return _summary(results, other, duration)


def _create_jobs(address: str, mode: str, names: list[str], extra: str, heavy_domains: int) -> None:
    """The ordinary jobs, and the heavy or burst mode's extra job."""
    from mixer.client import MixerClient

    ordinary = {"domains": [f"d{i}" for i in range(K)], "strategy": "odm", "cadence": {"update_every": 10}}
    with MixerClient(address) as c:
        for j in names:
            c.create_job({"name": j, **ordinary})
            c.get_job(j)
        if mode == "heavy":
            c.create_job(
                {
                    "name": extra,
                    "domains": [f"d{i}" for i in range(heavy_domains)],
                    "strategy": {"name": "ado", "params": HEAVY_SPEC_PARAMS},
                    "cadence": {"update_every": 1},
                }
            )
        elif mode == "burst":
            c.create_job({"name": extra, **ordinary})


def _workers(
    ctx,
    address: str,
    mode: str,
    names: list[str],
    extra: str,
    go,
    out,
    *,
    duration: float,
    window: int,
    rate: float,
    client_nice: int,
    heavy_domains: int,
    burst: int,
) -> list:
    """One session process per ordinary job, plus the heavy or burst process (not started)."""
    procs = [
        ctx.Process(
            target=_session_worker,
            args=(address, j, duration, window, rate, client_nice, go, out),
            daemon=True,
        )
        for j in names
    ]
    if mode == "heavy":
        procs.append(
            ctx.Process(
                target=_heavy_worker,
                args=(address, extra, heavy_domains, duration, go, out),
                daemon=True,
            )
        )
    elif mode == "burst":
        procs.append(ctx.Process(target=_burst_worker, args=(address, extra, burst, go, out), daemon=True))
    return procs


def _wait_ready(out, n: int) -> list[dict[str, Any]]:
    """Wait (at most 300 s + 1 s per process) until all `n` processes are ready; results that came early."""
    ready, results = 0, []
    deadline = time.time() + 300 + n
    while ready < n and time.time() < deadline:
        with contextlib.suppress(queue.Empty):
            msg = out.get(timeout=1)
            if "ready" in msg:
                ready += 1
            else:
                results.append(msg)
    return results


def _collect(out, results: list[dict[str, Any]], jobs: int, *, wait_other: bool) -> dict[str, Any]:
    """Append the ordinary jobs' results to `results` (at most 600 s); the heavy or burst result."""
    other: dict[str, Any] = {}
    deadline = time.time() + 600
    while (len(results) < jobs or (wait_other and not other)) and time.time() < deadline:
        with contextlib.suppress(queue.Empty):
            msg = out.get(timeout=1)
            if "heavy" in msg or "burst" in msg:
                other = msg
            elif "ready" not in msg:
                results.append(msg)
    return other


def _summary(results: list[dict[str, Any]], other: dict[str, Any], duration: float) -> dict[str, Any]:
    lat = (
        np.concatenate([np.asarray(r.get("lat_ms", []), dtype=float) for r in results])
        if results
        else np.zeros(0)
    )
    acked = sum(r.get("acked", 0) for r in results)
    res: dict[str, Any] = {
        "ordinary_ack_p50_ms": float(np.percentile(lat, 50)) if lat.size else float("nan"),
        "ordinary_ack_p99_ms": float(np.percentile(lat, 99)) if lat.size else float("nan"),
        "ordinary_ack_max_ms": float(lat.max()) if lat.size else float("nan"),
        "ordinary_reports_per_s": acked / duration,
        "ordinary_errors": [r["error"] for r in results if "error" in r][:3],
    }
    if "heavy" in other:
        ms = np.asarray(other["ack_ms"])
        res.update(
            heavy_updates=other["updates"],
            heavy_update_ack_p50_ms=float(np.percentile(ms, 50)) if ms.size else float("nan"),
        )
    if "burst" in other:
        res.update(
            burst_resent=other["resent"], burst_duplicates=other["duplicates"], burst_seconds=other["seconds"]
        )
    return res


def run_isolation(
    *,
    jobs: int = 16,
    rate: float = 20.0,
    duration: float = 20.0,
    burst: int = 20_000,
    heavy_domains: int = HEAVY_DOMAINS,
    window: int = 4,
    modes: tuple[str, ...] = MODES,
    client_nice: int = CLIENT_NICE,
    db: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """`rate`: reports/s of each ordinary job; `window`: its unacknowledged reports at most."""
    for name, value, lo in (
        ("jobs", jobs, 1),
        ("rate", rate, 0.1),
        ("duration", duration, 2.0),
        ("burst", burst, 1),
        ("heavy_domains", heavy_domains, 2),
        ("window", window, 1),
    ):
        if not value >= lo:
            raise ValueError(f"{name}: must be >= {lo}, got {value}")
    unknown = set(modes) - set(MODES)
    if unknown or not modes:
        raise ValueError(f"modes: choose among {', '.join(MODES)}, got {', '.join(modes) or 'none'}")
    result: dict[str, Any] = {
        "jobs": jobs,
        "rate_per_job": rate,
        "duration_s": duration,
        "window": window,
        "cpus": os.cpu_count(),
    }
    for mode in modes:
        result[mode] = _mode(
            mode,
            jobs=jobs,
            rate=rate,
            duration=duration,
            burst=burst,
            heavy_domains=heavy_domains,
            window=window,
            client_nice=client_nice,
            db=db,
            progress=progress,
        )
    base = result.get("alone", {}).get("ordinary_reports_per_s")
    for mode in ("heavy", "burst"):
        if base and mode in result:
            result[mode]["throughput_vs_alone"] = result[mode]["ordinary_reports_per_s"] / base
    if progress:
        for mode in modes:
            for k, v in result[mode].items():
                print(f"{mode:>6} {k:>26}: {v:,.3f}" if isinstance(v, float) else f"{mode:>6} {k:>26}: {v}")
    return result
