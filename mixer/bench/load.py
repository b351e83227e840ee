"""`mixer bench load`: many concurrent sessions, each in its own process, at full rate.

Starts a real `mixer serve` (SQLite in a temporary folder unless --db is given), one job per
session, and N client processes that each stream small per-domain reports over a session with
a bounded window of unacknowledged reports, for a fixed duration. Prints throughput,
acknowledgement latency, the server's memory at start and end, and the exact count of reports
in the log against the count acknowledged and sent. Bounded: it stops by itself.
"""

from __future__ import annotations

import multiprocessing as mp
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

K = 8


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _session_worker(address: str, job: str, duration: float, window: int, start_at: float, out: mp.Queue) -> None:
    """One client process: stream reports for `duration` seconds, then drain and report counts."""
    import grpc

    from mixer.client import channel
    from mixer.v1 import mixer_pb2 as pb
    from mixer.v1 import mixer_pb2_grpc as pb_grpc

    rng = np.random.default_rng(abs(hash(job)) % 2**32)
    loss = rng.uniform(1, 4, K).tolist()
    tokens = [256.0] * K
    permits = threading.Semaphore(window)
    sent_at: dict[int, float] = {}
    latencies: list[float] = []
    state = {"sent": 0}

    def requests():
        yield pb.SessionRequest(hello=pb.Hello(job=job, source="load"))
        while time.time() < start_at:
            time.sleep(0.001)
        end = time.time() + duration
        step = 0
        while time.time() < end:
            if not permits.acquire(timeout=0.1):
                continue
            sent_at[step] = time.perf_counter()
            yield pb.SessionRequest(report=pb.Signals(step=step, source="load", domain_loss_sum=loss, domain_token_count=tokens))
            step += 1
            state["sent"] = step
        # Returning half-closes the stream: the service acknowledges what it took, then ends it.

    acked = 0
    errors = 0
    error = None
    ch = channel(address)
    try:
        for resp in pb_grpc.MixerServiceStub(ch).Session(requests()):
            kind = resp.WhichOneof("kind")
            if kind == "ack":
                t = sent_at.pop(resp.ack.step, None)
                if t is not None:
                    latencies.append(time.perf_counter() - t)
                acked += 1
                permits.release()
            elif kind == "nack":
                errors += 1
                permits.release()
    except grpc.RpcError as e:
        error = f"{e.code().name}: {e.details()}"
    finally:
        ch.close()
    lat = np.asarray(latencies) * 1000
    result = {"job": job, "sent": state["sent"], "acked": acked, "errors": errors, "lat_ms": lat.tolist()[:: max(1, lat.size // 5000)]}
    if error:
        result["error"] = error
    out.put(result)


def run_load_bench(*, sessions: int = 64, duration: float = 120.0, window: int = 32, db: str | None = None, progress: bool = True) -> dict[str, Any]:
    from mixer.client import MixerClient
    from mixer.server.launch import ServerProcess
    from mixer.store import Store

    with tempfile.TemporaryDirectory(prefix="mixer-load-") as tmp:
        db_url = db or str(Path(tmp) / "load.db")
        srv = ServerProcess(db_url, Path(tmp)).start()
        try:
            stamp = int(time.time())
            jobs = [f"load-{stamp}-{i}" for i in range(sessions)]
            with MixerClient(srv.address) as c:
                for j in jobs:
                    c.create_job({"name": j, "domains": [f"d{i}" for i in range(K)], "strategy": "odm", "cadence": {"update_every": 10}})
                    c.get_job(j)  # load it before the clock starts
            rss_start = _rss_bytes(srv.proc.pid)
            ctx = mp.get_context("spawn")
            out: mp.Queue = ctx.Queue()
            start_at = time.time() + 3.0 + sessions * 0.05  # every process connected before the clock starts
            procs = [ctx.Process(target=_session_worker, args=(srv.address, j, duration, window, start_at, out), daemon=True) for j in jobs]
            for p in procs:
                p.start()
            results = []
            bar = tqdm(total=sessions, desc=f"{sessions} sessions x {duration:.0f}s", unit="session", disable=not progress)
            deadline = start_at + duration + 120
            while len(results) < sessions and time.time() < deadline:
                try:
                    results.append(out.get(timeout=1))
                    bar.update(1)
                except Exception:  # noqa: BLE001 - queue.Empty: keep waiting until the deadline
                    pass
            bar.close()
            for p in procs:
                p.join(5)
                if p.is_alive():
                    p.kill()
            rss_end = _rss_bytes(srv.proc.pid)
        finally:
            srv.terminate()
        store = Store(db_url)
        in_log = sum(store.log_stats(store.get_job(j).id)[0] for j in jobs)
        store.close()
    sent = sum(r.get("sent", 0) for r in results)
    acked = sum(r.get("acked", 0) for r in results)
    lat = np.concatenate([np.asarray(r.get("lat_ms", []), dtype=float) for r in results]) if results else np.zeros(0)
    result = {
        "sessions": sessions,
        "sessions_reporting": len(results),
        "duration_s": duration,
        "window": window,
        "reports_sent": sent,
        "reports_acked": acked,
        "reports_in_log": in_log,
        "log_equals_acked": in_log == acked,
        "reports_per_s": acked / duration,
        "ack_p50_ms": float(np.percentile(lat, 50)) if lat.size else float("nan"),
        "ack_p99_ms": float(np.percentile(lat, 99)) if lat.size else float("nan"),
        "server_rss_start_mb": rss_start / 2**20,
        "server_rss_end_mb": rss_end / 2**20,
        "server_rss_growth": (rss_end - rss_start) / rss_start if rss_start else float("nan"),
        "errors": [r["error"] for r in results if "error" in r][:5],
    }
    if progress:
        for k, v in result.items():
            print(f"{k:>22}: {v:,.3f}" if isinstance(v, float) else f"{k:>22}: {v}")
    return result
