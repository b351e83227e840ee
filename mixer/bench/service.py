"""`mixer bench service`: durable ingest, GetWeights latency and push latency on loopback.

Starts a real `mixer serve` subprocess (SQLite in a temporary folder unless --db is given),
streams reports of N per-sample losses over concurrent sessions, and measures from the
client side: a report counts once the service acknowledged it, i.e. once it is committed.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from tqdm import tqdm

from mixer.client import MixerClient, Reporter
from mixer.server.launch import ServerProcess
from mixer.v1 import mixer_pb2 as pb

K = 8


def _make_reports(n: int, samples: int, source: str, seed: int) -> list[pb.Signals]:
    rng = np.random.default_rng(seed)
    out = []
    for step in range(n):
        dom = rng.integers(0, K, samples).astype(np.int32)
        loss = rng.gamma(4.0, 0.5, samples).astype(np.float32)
        counts = np.bincount(dom, minlength=K)
        out.append(
            pb.Signals(
                step=step,
                source=source,
                domain_loss_sum=np.bincount(dom, weights=loss.astype(np.float64) * 64, minlength=K).tolist(),
                domain_token_count=(counts * 64.0).tolist(),
                domain_sample_count=counts.tolist(),
                sample_loss=loss.tobytes(),
                sample_domain=dom.tobytes(),
                sample_id=(np.arange(samples, dtype=np.int64) + step * samples).tobytes(),
            )
        )
    return out


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def run_service_bench(*, reports: int = 2000, samples: int = 4096, sessions: int = 4, db: str | None = None, progress: bool = True) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="mixer-bench-") as tmp:
        workdir = Path(tmp)
        db_url = db or str(workdir / "bench.db")
        srv = ServerProcess(db_url, workdir).start()
        try:
            return _run(srv.address, db_url, reports, samples, sessions, progress)
        finally:
            srv.terminate()


def _run(address: str, db_url: str, reports: int, samples: int, sessions: int, progress: bool) -> dict[str, Any]:
    job = f"bench-{int(time.time())}"
    client = MixerClient(address)
    client.create_job({"name": job, "domains": [f"d{i}" for i in range(K)], "strategy": "odm", "cadence": {"update_every": 10}})
    per = reports // sessions
    batches = [_make_reports(per, samples, f"s{i}", i) for i in range(sessions)]

    push_lat: list[float] = []
    stop_watch = threading.Event()

    def watch() -> None:
        try:
            for v in client.watch(job, after=0, timeout=600):
                if v.created_at:
                    push_lat.append(time.time() - v.created_at)
                if stop_watch.is_set():
                    return
        except grpc.RpcError:
            return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    reporters = [Reporter(address, job, f"s{i}", max_buffer=per + 1).start() for i in range(sessions)]
    for r in reporters:
        r.connected.wait(30)
    bar = tqdm(total=per * sessions, desc="ingest", unit="report", disable=not progress)
    t0 = time.perf_counter()
    for i in range(per):
        for r, batch in zip(reporters, batches):
            r.submit(batch[i])
    done = 0
    while done < per * sessions:
        acked = sum(r.acked for r in reporters)
        bar.update(acked - done)
        done = acked
        if done < per * sessions:
            time.sleep(0.005)
    elapsed = time.perf_counter() - t0
    bar.close()
    for r in reporters:
        r.close()
    stop_watch.set()

    lat = []
    for _ in tqdm(range(2000), desc="GetWeights", disable=not progress):
        t = time.perf_counter()
        client.get_weights(job)
        lat.append((time.perf_counter() - t) * 1000)
    step_lat = []
    for i in range(500):
        t = time.perf_counter()
        client.get_weights(job, step=i % per)
        step_lat.append((time.perf_counter() - t) * 1000)
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
