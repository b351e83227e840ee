"""`mixer bench service`: durable ingest, GetWeights latency and push latency on loopback.

Starts a real `mixer serve` subprocess (SQLite in a temporary folder unless --db is given),
streams reports of N per-sample losses over concurrent sessions (each session's producer keeps
at most IN_FLIGHT unacknowledged, made as they are submitted), and measures from the client side:
a report counts once the service acknowledged it, i.e. once it is committed. Beside the rates it
reports the server's CPU time per report over the ingest (user + system, all its threads): on a
shared machine the wall-clock rate moves with the other work, the CPU a report costs far less.
Push latency is from a version's `created_at` (stamped once its commit is known on the event loop)
to its receipt by a WatchWeights stream in a process of its own (a dashboard or a second trainer:
a watcher thread inside the reporting process would time that process's interpreter lock, not the
service).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from tqdm import tqdm

from mixer.bench.launch import ServerProcess, cpu_seconds
from mixer.client import MixerClient
from mixer.reporter import Reporter
from mixer.v1 import mixer_pb2 as pb

K = 8


IN_FLIGHT = 256
"""Reports a session's producer keeps unacknowledged at most (16 MiB at 4,096 samples): the
reporters send as fast as the service takes them, without the whole run held in memory."""
DISTINCT = 32
"""Distinct per-sample arrays per session, cycled (the values do not change the service's work)."""


class _Producer:
    """One session's reports, made as they are submitted: per-sample losses and domains cycled
    from a few random draws, ids unique per report."""

    def __init__(self, samples: int, source: str, seed: int):
        rng = np.random.default_rng(seed)
        self.samples, self.source, self.pool = samples, source, []
        for _ in range(DISTINCT):
            dom = rng.integers(0, K, samples).astype(np.int32)
            loss = rng.gamma(4.0, 0.5, samples).astype(np.float32)
            counts = np.bincount(dom, minlength=K)
            self.pool.append(
                {
                    "domain_loss_sum": np.bincount(
                        dom, weights=loss.astype(np.float64) * 64, minlength=K
                    ).tolist(),
                    "domain_token_count": (counts * 64.0).tolist(),
                    "domain_sample_count": counts.tolist(),
                    "sample_loss": loss.tobytes(),
                    "sample_domain": dom.tobytes(),
                }
            )

    def report(self, step: int) -> pb.Signals:
        ids = np.arange(self.samples, dtype=np.int64) + step * self.samples
        return pb.Signals(
            step=step, source=self.source, sample_id=ids.tobytes(), **self.pool[step % DISTINCT]
        )

    def feed(self, reporter: Reporter, steps: int) -> None:
        for step in range(steps):
            reporter.wait_pending(IN_FLIGHT - 1)
            reporter.submit(self.report(step))


def _watch(address: str, job: str, stop, out) -> None:
    """A watcher process: the delay from each version's commit to its arrival here, until `stop`."""
    client = MixerClient(address)
    lat: list[float] = []
    subscribed = threading.Event()

    def read() -> None:
        with contextlib.suppress(grpc.RpcError):
            for v in client.watch(job, after=-1, timeout=600):
                if v.version == 0:  # the job's initial version: the stream is open
                    subscribed.set()
                elif v.created_at:
                    lat.append(time.time() - v.created_at)

    threading.Thread(target=read, daemon=True).start()
    out.put("ready" if subscribed.wait(60) else "no stream")
    stop.wait(3600)
    out.put(list(lat))


def _get_weights_ms(
    client: MixerClient, job: str, steps: int, progress: bool
) -> tuple[list[float], list[float]]:
    """GetWeights round trips (ms): 2,000 for the newest version, 500 at steps the run reported."""
    lat = []
    for _ in tqdm(range(2000), desc="GetWeights", disable=not progress):
        t = time.perf_counter()
        client.get_weights(job)
        lat.append((time.perf_counter() - t) * 1000)
    step_lat = []
    for i in range(500):
        t = time.perf_counter()
        client.get_weights(job, step=i % steps)
        step_lat.append((time.perf_counter() - t) * 1000)
    return lat, step_lat


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


MAX_BENCH_SAMPLES = 1 << 16
"""Per-sample losses per report at most: a session keeps up to IN_FLIGHT reports (1 MiB each at
this bound) in memory."""
MAX_BENCH_SESSIONS = 64
REPORTS = 8000
"""Reports ingested by default: enough versions (200) for a p99 of push latency."""


def run_service_bench(
    *,
    reports: int = REPORTS,
    samples: int = 4096,
    sessions: int = 4,
    db: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    if not 1 <= sessions <= MAX_BENCH_SESSIONS:
        raise ValueError(f"sessions: must be in [1, {MAX_BENCH_SESSIONS}], got {sessions}")
    if not 1 <= samples <= MAX_BENCH_SAMPLES:
        raise ValueError(f"samples: must be in [1, {MAX_BENCH_SAMPLES}], got {samples}")
    if reports < sessions:
        raise ValueError(f"reports: {reports} cannot be split over {sessions} sessions; give at least one per session")
    with tempfile.TemporaryDirectory(prefix="mixer-bench-") as tmp:
        workdir = Path(tmp)
        db_url = db or str(workdir / "bench.db")
        srv = ServerProcess(db_url, workdir).start()
        try:
            return _run(srv.address, db_url, reports, samples, sessions, progress, srv.proc.pid)
        finally:
            srv.terminate()


def _run(
    address: str, db_url: str, reports: int, samples: int, sessions: int, progress: bool, pid: int
) -> dict[str, Any]:
    job = f"bench-{int(time.time())}"
    client = MixerClient(address)
    client.create_job(
        {
            "name": job,
            "domains": [f"d{i}" for i in range(K)],
            "strategy": "odm",
            "cadence": {"update_every": 10},
        }
    )
    per = reports // sessions
    producers = [_Producer(samples, f"s{i}", i) for i in range(sessions)]

    ctx = mp.get_context("spawn")
    watch_out: mp.Queue = ctx.Queue()
    stop_watch = ctx.Event()
    watcher = ctx.Process(target=_watch, args=(address, job, stop_watch, watch_out), daemon=True)
    watcher.start()
    if watch_out.get(timeout=60) != "ready":
        raise RuntimeError("the watcher process did not start")
    reporters = [Reporter(address, job, f"s{i}", max_buffer=IN_FLIGHT + 1).start() for i in range(sessions)]
    for r in reporters:
        r.connected.wait(30)
    bar = tqdm(total=per * sessions, desc="ingest", unit="report", disable=not progress)
    t0, cpu0 = time.perf_counter(), cpu_seconds(pid)
    feeders = [
        threading.Thread(target=p.feed, args=(r, per), daemon=True) for p, r in zip(producers, reporters)
    ]
    for f in feeders:
        f.start()
    done = 0
    while done < per * sessions:
        acked = sum(r.acked for r in reporters)
        bar.update(acked - done)
        done = acked
        if done < per * sessions:
            time.sleep(0.005)
    elapsed, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
    bar.close()
    for r in reporters:
        r.close()
    stop_watch.set()
    push_lat: list[float] = watch_out.get(timeout=60)
    watcher.join(10)

    lat, step_lat = _get_weights_ms(client, job, per, progress)
    info = client.get_job(job)
    client.close()
    total = per * sessions
    result = {
        "db": "postgresql" if db_url.startswith("postgres") else "sqlite",
        "sessions": sessions,
        "reports": total,
        "samples_per_report": samples,
        "reports_in_log": info.report_count,
        "reports_per_s": total / elapsed,
        "sample_losses_per_s": total * samples / elapsed,
        "server_cpu_us_per_report": cpu / total * 1e6,
        "get_weights_latest_p50_ms": _pct(lat, 50),
        "get_weights_latest_p99_ms": _pct(lat, 99),
        "get_weights_at_step_p50_ms": _pct(step_lat, 50),
        "get_weights_at_step_p99_ms": _pct(step_lat, 99),
        "push_latency_p50_ms": _pct(push_lat, 50) * 1000,
        "push_latency_p99_ms": _pct(push_lat, 99) * 1000,
        "versions_pushed": len(push_lat),
    }
    if progress:
        for k, v in result.items():
            print(f"{k:>28}: {v:,.3f}" if isinstance(v, float) else f"{k:>28}: {v}")
    return result
