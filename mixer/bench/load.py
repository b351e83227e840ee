"""`mixer bench load`: many concurrent sessions at full rate.

Starts a real `mixer serve` (SQLite in a temporary folder unless --db is given), one job per
session, and client processes that stream small per-domain reports with a bounded window of
unacknowledged reports, for a fixed duration. `client="aio"` (the default) runs the sessions as
asyncio tasks in AIO_PROCS processes speaking the Session protocol directly (load_aio.py: the
load generator takes as little of the machine as it can from the server it measures);
`client="reporter"` runs one process per session with the Reporter a training job uses (a
thread, a synchronous stream; it sends whatever is queued as one batch message), so the
client's own cost is in the figures too. Prints throughput, acknowledgement latency, the
server's CPU per report (all its threads, and its event loop alone), the server's memory at
start (once every session is up and has streamed for a warm-up of min(10 s, duration/10)) and
at the end of the streaming, and the exact count of reports in the log against the count
acknowledged and sent. The clock starts once every session is connected (64 interpreters
starting on two cores take a while). The client processes run at a lower CPU priority
(`--client-nice`, 10 by default) than the server they measure. Bounded: it stops by itself.

`servers=N` (N > 1, PostgreSQL only) runs `mixer serve --workers N` instead: N processes share the
port, the job names are drawn so that their rendezvous owners cycle through the workers (each owns 1/N),
and the sessions connect to the shared port and are sent on to their job's owner. Its memory is
the sum over the workers. `compare_servers` runs the benchmark once per server count, on the same
database, with --ha in every run (so a lone server pays the same lease checks), and prints the
runs side by side.
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

from mixer.bench.load_session import K, session_result, session_values

WINDOW = 5
"""Unacknowledged reports per session: at 64 sessions, 10,000 reports/s with 320 in flight is
32 ms each on average (Little's law: in flight = throughput x latency)."""
CLIENTS = ("aio", "reporter")
"""`aio`: a few processes run the sessions as asyncio tasks (load_aio.py; the least CPU taken from
the server under test). `reporter`: one process per session, each with the Reporter a training
job runs (the client's own cost included)."""
AIO_PROCS = 2
"""Client processes with `client="aio"`; the sessions are dealt out among them."""
CLIENT_NICE = 10
"""The client processes' niceness: they share the machine with the server, as load generators
should, without taking the CPU from it when both want it (clients of a real deployment run on
other machines). 0 puts them on an equal footing."""


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _session_worker(
    address: str, job: str, duration: float, window: int, rate: float, nice: int, go, out: mp.Queue
) -> None:
    """One client process: a Reporter (the client training jobs use) fed as fast as it takes
    reports (or at `rate` reports/s when > 0), with at most `window` unacknowledged; then drain,
    and report counts and latencies."""
    os.nice(nice)  # a load generator: the server under test gets the CPU first when both want it
    from mixer.reporter import Reporter
    from mixer.v1 import mixer_pb2 as pb

    loss, tokens = session_values(job)
    sent_at: dict[int, float] = {}
    latencies: list[float] = []

    def on_ack(step: int, seq: int) -> None:  # the reporter's thread
        t = sent_at.pop(step, None)
        if t is not None:
            latencies.append(time.perf_counter() - t)

    reporter = Reporter(address, job, "load", max_buffer=4 * window, on_ack=on_ack).start()
    error = None
    if not reporter.connected.wait(60):
        error = f"no session within 60 s: {reporter.last_error}"
    out.put({"ready": job})
    go.wait(300)  # the clock starts once every session is connected
    end = time.time() + duration
    step = 0
    due = time.perf_counter()
    while error is None and time.time() < end:
        if rate > 0:  # paced: the next report is due 1/rate after the previous one was
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
        # Full rate: the next window as soon as the last one is acknowledged (it goes as one
        # message: for a given number of reports in flight, the fewest messages). Paced: one
        # report when it is due and the window allows.
        if not reporter.wait_pending(window - 1 if rate > 0 else 0, timeout=0.1):
            continue
        for _ in range(1 if rate > 0 else window - reporter.pending):
            # Paced, latency counts from when the report was due (a client held back by a full
            # window or a slow process still counts the wait: no coordinated omission).
            sent_at[step] = min(due, time.perf_counter()) if rate > 0 else time.perf_counter()
            due += 1.0 / rate if rate > 0 else 0.0
            reporter.submit(
                pb.Signals(step=step, source="load", domain_loss_sum=loss, domain_token_count=tokens)
            )
            step += 1
    if not reporter.close(timeout=120) and error is None:
        error = f"{reporter.pending} reports unacknowledged at the end: {reporter.last_error}"
    out.put(session_result(job, step, reporter.acked, len(reporter.rejected), latencies, error))


def _server_rss(srv) -> int:
    """The server's memory: the process, or the sum over its workers (the parent serves nothing)."""
    return (
        sum(_rss_bytes(pid) for pid in srv.worker_pids().values())
        if srv.workers > 1
        else _rss_bytes(srv.proc.pid)
    )


MAX_SESSIONS = 1024
MIN_DURATION_S, MAX_DURATION_S = 1.0, 86_400.0


def run_load_bench(
    *,
    sessions: int = 64,
    duration: float = 120.0,
    window: int = WINDOW,
    rate: float = 0.0,
    client_nice: int = CLIENT_NICE,
    db: str | None = None,
    servers: int = 1,
    ha: bool = False,
    client: str = "aio",
    progress: bool = True,
) -> dict[str, Any]:
    """`rate`: total reports/s offered across the sessions (0: each session at full rate).
    `servers`: server processes (`mixer serve --workers`, PostgreSQL only); `ha`: serve with --ha.
    `client`: one of CLIENTS."""
    from mixer.bench.launch import ServerProcess
    from mixer.store import Store

    if client not in CLIENTS:
        raise ValueError(f"client: must be one of {', '.join(CLIENTS)}, got {client!r}")
    if not 1 <= sessions <= MAX_SESSIONS:
        raise ValueError(f"sessions: must be in [1, {MAX_SESSIONS}], got {sessions}")
    if not MIN_DURATION_S <= duration <= MAX_DURATION_S:
        raise ValueError(f"duration: must be in [{MIN_DURATION_S:g}, {MAX_DURATION_S:g}] seconds, got {duration}")
    if not 1 <= servers <= 64:
        raise ValueError(f"servers: must be in [1, 64], got {servers}")
    if (servers > 1 or ha) and not (db or "").startswith("postgres"):
        raise ValueError(
            f"servers={servers}{' with --ha' if ha else ''} needs a PostgreSQL database (--db postgresql://...)"
        )
    with tempfile.TemporaryDirectory(prefix="mixer-load-") as tmp:
        db_url = db or str(Path(tmp) / "load.db")
        srv = ServerProcess(
            db_url, Path(tmp), ["--ha"] if ha and servers == 1 else [], workers=servers
        ).start()
        try:
            jobs = _create_jobs(srv, sessions, servers, db_url)
            rss_before = _server_rss(srv)
            clients = _Clients(srv.address, jobs, duration, window, rate, client_nice, client)
            ready = clients.connect(progress)
            warm, rss_start, rss_end, cpu = _stream(srv, clients, duration, progress)
            results = clients.collect()
        finally:
            srv.terminate()
        store = Store(db_url)
        in_log = sum(store.log_stats(store.get_job(j).id)[0] for j in jobs)
        store.close()
    tally = _tally(results, in_log, duration)
    result = {
        "servers": servers,
        "ha": ha or servers > 1,
        "sessions": sessions,
        "sessions_reporting": len(results),
        "duration_s": duration,
        "window": window,
        "offered_rate": rate or "full",
        "client": client,
        "client_processes": len(clients.procs),
        "client_nice": client_nice,
        **tally,
        # Over the streaming, per report acknowledged (the last few are settled after it: slightly low).
        "server_cpu_us_per_report": cpu[0] / max(1, tally["reports_acked"]) * 1e6,
        "server_loop_cpu_us_per_report": cpu[1] / max(1, tally["reports_acked"]) * 1e6,
        "sessions_connected": ready,
        "server_rss_before_sessions_mb": rss_before / 2**20,
        "rss_warmup_s": warm,
        "server_rss_start_mb": rss_start / 2**20,
        "server_rss_end_mb": rss_end / 2**20,
        "server_rss_growth": (rss_end - rss_start) / rss_start if rss_start else float("nan"),
        "errors": [r["error"] for r in results if "error" in r][:5],
    }
    if progress:
        for k, v in result.items():
            print(f"{k:>22}: {v:,.3f}" if isinstance(v, float) else f"{k:>22}: {v}")
    return result


def _create_jobs(srv, sessions: int, servers: int, db: str | None = None) -> list[str]:
    """One job per session, loaded. With several servers, job names are drawn so that the jobs'
    rendezvous owners cycle through the live servers: each owns 1/N of them (placement is by name,
    mixer.server.runtime)."""
    from mixer.client import MixerClient

    stamp = int(time.time())
    jobs = [f"load-{stamp}-s{servers}-{i}" for i in range(sessions)]
    if servers > 1 and db:
        from mixer.store import Store
        from mixer.store.repository import rendezvous_order

        store = Store(db)
        try:  # every worker's first heartbeat lands just after it answers health checks
            deadline = time.monotonic() + 30
            while len(ids := sorted(store.live_servers())) < servers and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            store.close()
        if not ids:
            raise RuntimeError(f"no live server heartbeat in {db} within 30 s")
        for i in range(sessions):
            want, salt = ids[i % len(ids)], 0
            while rendezvous_order(f"{jobs[i]}-{salt}", ids)[0] != want:
                salt += 1
            jobs[i] = f"{jobs[i]}-{salt}"
    for j in jobs:
        with MixerClient(",".join(srv.worker_addresses)) as c:  # any worker: a non-owner sends us on
            c.create_job(
                {
                    "name": j,
                    "domains": [f"d{i}" for i in range(K)],
                    "strategy": "odm",
                    "cadence": {"update_every": 10},
                }
            )
            c.get_job(j)  # load it before the clock starts
    return jobs


class _Clients:
    """The client processes, started, connected, released at once, collected: one per job
    (`client="reporter"`), or `aio_procs` running the sessions as tasks (`client="aio"`)."""

    def __init__(
        self, address: str, jobs: list[str], duration: float, window: int, rate: float, nice: int,
        client: str = "aio", aio_procs: int = AIO_PROCS,
    ):
        ctx = mp.get_context("spawn")
        self.out: mp.Queue = ctx.Queue()
        self.go = ctx.Event()
        self.results: list[dict[str, Any]] = []
        self.sessions = len(jobs)
        per = rate / len(jobs)
        if client == "aio":
            from mixer.bench.load_aio import sessions_worker

            n = min(len(jobs), aio_procs)
            self.procs = [
                ctx.Process(
                    target=sessions_worker,
                    args=(address, jobs[i::n], duration, window, per, nice, self.go, self.out),
                    daemon=True,
                )
                for i in range(n)
            ]
        else:
            self.procs = [
                ctx.Process(
                    target=_session_worker,
                    args=(address, j, duration, window, per, nice, self.go, self.out),
                    daemon=True,
                )
                for j in jobs
            ]

    def connect(self, progress: bool) -> int:
        """Start every client, wait until each has its session (or gave up), and start the clock."""
        for p in self.procs:
            p.start()
        n = self.sessions
        ready = 0
        bar = tqdm(total=n, desc="connecting", unit="session", disable=not progress)
        deadline = time.time() + 120 + n
        while ready < n and time.time() < deadline:
            with contextlib.suppress(queue.Empty):
                msg = self.out.get(timeout=1)
                if "ready" in msg:
                    ready += 1
                    bar.update(1)
                else:  # a worker that ended early (an error)
                    self.results.append(msg)
        bar.close()
        self.go.set()
        return ready

    def collect(self) -> list[dict[str, Any]]:
        """Every client's counts and latencies (within 150 s of the end of the streaming)."""
        deadline = time.time() + 150
        while len(self.results) < self.sessions and time.time() < deadline:
            with contextlib.suppress(queue.Empty):
                msg = self.out.get(timeout=1)
                if "ready" not in msg:
                    self.results.append(msg)
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()
        return self.results


def _server_cpu(srv) -> tuple[float, float]:
    """CPU seconds the server has used so far: all its threads, and its event loops' threads alone
    (the main thread of each serving process)."""
    from mixer.bench.launch import cpu_seconds

    pids = list(srv.worker_pids().values()) if srv.workers > 1 else [srv.proc.pid]
    return sum(cpu_seconds(p) for p in pids), sum(cpu_seconds(p, p) for p in pids)


def _stream(srv, clients: _Clients, duration: float, progress: bool) -> tuple[float, int, int, tuple[float, float]]:
    """Wait out the streaming; the server's memory once warm (min(10 s, duration/10)) and at the
    end, and the CPU it used while the sessions streamed (all threads, the event loops)."""
    cpu0 = _server_cpu(srv)
    t_go = time.time()
    warm = min(10.0, duration / 10)
    rss_start = 0
    bar = tqdm(
        total=int(duration),
        desc=f"{clients.sessions} sessions x {duration:.0f}s",
        unit="s",
        disable=not progress,
    )
    while time.time() < t_go + duration:
        time.sleep(min(1.0, max(0.0, t_go + duration - time.time())))
        bar.n = min(int(duration), int(time.time() - t_go))
        bar.refresh()
        if not rss_start and time.time() >= t_go + warm:
            rss_start = _server_rss(srv)
    rss_end = _server_rss(srv)
    cpu1 = _server_cpu(srv)
    bar.close()
    return warm, rss_start, rss_end, (cpu1[0] - cpu0[0], cpu1[1] - cpu0[1])


def _tally(results: list[dict[str, Any]], in_log: int, duration: float) -> dict[str, Any]:
    """Counts, throughput and acknowledgement latency over every client."""
    acked = sum(r.get("acked", 0) for r in results)
    lat = (
        np.concatenate([np.asarray(r.get("lat_ms", []), dtype=float) for r in results])
        if results
        else np.zeros(0)
    )
    return {
        "reports_sent": sum(r.get("sent", 0) for r in results),
        "reports_acked": acked,
        "reports_in_log": in_log,
        "log_equals_acked": in_log == acked,
        "reports_per_s": acked / duration,
        "ack_p50_ms": float(np.percentile(lat, 50)) if lat.size else float("nan"),
        "ack_p99_ms": float(np.percentile(lat, 99)) if lat.size else float("nan"),
    }


def compare_servers(counts: list[int], *, progress: bool = True, **kw) -> dict[str, Any]:
    """`run_load_bench` once per server count (--ha in each), side by side."""
    runs = [run_load_bench(servers=n, ha=True, progress=False, **kw) for n in counts]
    if progress:
        keys = [
            "servers",
            "reports_per_s",
            "ack_p50_ms",
            "ack_p99_ms",
            "log_equals_acked",
            "server_rss_end_mb",
            "sessions_reporting",
        ]
        print(f"{'':>20}" + "".join(f"{'run ' + str(i + 1):>14}" for i in range(len(runs))))
        for k in keys:
            print(
                f"{k:>20}"
                + "".join(f"{r[k]:>14,.1f}" if isinstance(r[k], float) else f"{r[k]!s:>14}" for r in runs)
            )
        for r in runs:
            for e in r["errors"]:
                print(f"servers={r['servers']}: {e}")
    return {"runs": runs}
