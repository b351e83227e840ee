"""Where a job's costly work runs, away from the event loop: lanes (threads) and update processes.

A `Lane` is one job's serial queue of work, run on a shared thread pool: what it does never
blocks the loop on I/O. But a thread that computes for long holds the interpreter lock, and the
loop, which gives the lock up at every system call, then waits up to a switch interval each time
to get it back (a convoy: measured, one ADO refit at K=64 on a lane thread took the other jobs'
ack p50 from 7 ms to 200 ms). So a strategy update that has once taken longer than `COSTLY_S`
runs, from then on, in an update process (`UpdateProcesses`): the lane thread waits for it
without the lock. The update is the strategy's own pure function, given the same state and window
(pickled exactly) in a process with the same libraries and settings, so its result is the same,
bit for bit, as in the server's process or in a replay. A job keeps to one process (its updates
are serial anyway), so a strategy that keeps caches of its own sees its updates in order.
Ours: the threshold and the stickiness (once costly, always in a process, for the runtime's life:
ADO's refits come every `refit_every` steps among cheap updates, and moving back and forth would
put every refit on a thread).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

log = logging.getLogger("mixer.server")

COSTLY_S = 0.02
"""An update that took longer than this (seconds, on the calling thread) sends the job's later
updates to an update process: 20 ms of a thread holding the interpreter lock already costs the
loop tens of lock hand-overs; far more than the ~1 ms an update process adds (pickling, a pipe)."""
UPDATE_PROCESSES = max(1, min(4, (os.cpu_count() or 2) - 1))
"""Update processes (started when first needed): the cores the event loop does not use, at most 4."""
LOOP_UPDATES = frozenset({"static", "odm", "doremi"})
"""Strategies whose update is a few vector operations over the window (linear in its reports and
K: no fit, no training, no search), cheaper than admitting the window's reports: their updates run
on the event loop. Handing one to the lane and its result back costs more than the update
(thread wake-ups, the interpreter lock passed back and forth). `bench load --sessions 64`, ODM:
server CPU per report x0.89 in six interleaved pairs (181 to 162 us)."""
LOOP_UPDATE_S = 0.002
"""... unless LOOP_UPDATE_STRIKES updates in a row each took longer than this (seconds): the job's
later updates then go to its lane, as any other's."""
LOOP_UPDATE_STRIKES = 3
"""Consecutive updates over LOOP_UPDATE_S that send a job's updates to its lane. Timed by the wall
clock: a thread that was preempted once in the middle of an update does not move the job, a
strategy that is slow every time does. (The thread's CPU clock, which would not count preemption,
is a system call that cost 19 us a read on this loop under load, against 45 ns.)"""


class Lane:
    """One job's serial work off the event loop: items run in submission order, one at a time,
    on a thread of the shared pool."""

    __slots__ = ("_lock", "_pool", "_q", "_running")

    def __init__(self, pool: ThreadPoolExecutor):
        self._pool = pool
        self._q: deque[Callable[[], None]] = deque()
        self._lock = threading.Lock()
        self._running = False

    def submit(self, fn: Callable[[], None]) -> None:
        with self._lock:
            self._q.append(fn)
            if self._running:
                return
            self._running = True
        self._pool.submit(self._drain)

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._q:
                    self._running = False
                    return
                fn = self._q.popleft()
            try:
                fn()
            except Exception:  # an item settles its own errors; this only keeps the lane alive
                log.exception("lane work failed")


_STRATEGIES: dict[str, Any] = {}
"""In an update process: each job's strategy, built once from its spec (by fingerprint)."""


def _update_in_process(fingerprint: str, spec_json: str, state: Any, window: Any) -> tuple[Any, Any]:
    import numpy as np

    strategy = _STRATEGIES.get(fingerprint)
    if strategy is None:
        from mixer.spec import JobSpec
        from mixer.strategies import build_strategy

        strategy = _STRATEGIES[fingerprint] = build_strategy(JobSpec.from_json(spec_json))
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # as Engine.ingest calls it
        return strategy.update(state, window)


def _exit_with_parent(parent: int) -> None:
    """In an update process: exit once the server is gone (killed, it cannot shut its pool down)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="mixer-parent-watch", daemon=True).start()


class UpdateProcesses:
    """A few single-process pools, started when first needed; a job always goes to the same one."""

    def __init__(self, processes: int = UPDATE_PROCESSES):
        self._pools: list[ProcessPoolExecutor | None] = [None] * processes
        self._lock = threading.Lock()
        self._closed = False

    def run(self, job_id: int, fingerprint: str, spec_json: str, state: Any, window: Any) -> tuple[Any, Any]:
        """strategy.update(state, window) in the job's process; blocks the calling thread (not the lock)."""
        i = job_id % len(self._pools)
        with self._lock:
            if self._closed:
                raise RuntimeError("the update processes are shut down")
            pool = self._pools[i]
            if pool is None:
                pool = self._pools[i] = ProcessPoolExecutor(
                    max_workers=1,
                    mp_context=mp.get_context("spawn"),
                    initializer=_exit_with_parent,
                    initargs=(os.getpid(),),
                )
        return pool.submit(_update_in_process, fingerprint, spec_json, state, window).result()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pools, self._pools = self._pools, [None] * len(self._pools)
        for pool in pools:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)


class OffloadedStrategy:
    """A job's strategy as its engine sees it: `update` runs on the calling thread until one took
    longer than COSTLY_S, then in the job's update process. Everything else is the strategy's.
    `on_loop`: whether admission may run the job's next update on the event loop (LOOP_UPDATES)."""

    def __init__(
        self, strategy: Any, job_id: int, fingerprint: str, spec_json: str, processes: UpdateProcesses
    ):
        self._strategy = strategy
        self._job = (job_id, fingerprint, spec_json)
        self._processes = processes
        self.in_process = False
        self.name = strategy.name
        self.on_loop = strategy.name in LOOP_UPDATES
        self.strikes = 0
        """Updates in a row on the loop that took over LOOP_UPDATE_S."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._strategy, name)

    def update(self, state: Any, window: Any) -> tuple[Any, Any]:
        if self.in_process:
            return self._processes.run(*self._job, state, window)
        if self.on_loop:
            return self._update_cheap(state, window)
        t0 = time.perf_counter()
        out = self._strategy.update(state, window)
        if time.perf_counter() - t0 > COSTLY_S:
            self.in_process = True
            log.info(
                "job id %d: strategy %s took %.0f ms to update; its updates run in an update process from now on",
                self._job[0],
                self._strategy.name,
                (time.perf_counter() - t0) * 1000,
            )
        return out

    def _update_cheap(self, state: Any, window: Any) -> tuple[Any, Any]:
        """The update of a LOOP_UPDATES strategy; LOOP_UPDATE_STRIKES in a row over LOOP_UPDATE_S
        send the later ones to the lane."""
        t0 = time.perf_counter()
        out = self._strategy.update(state, window)
        took = time.perf_counter() - t0
        self.strikes = self.strikes + 1 if took > LOOP_UPDATE_S else 0
        if self.strikes >= LOOP_UPDATE_STRIKES:
            self.on_loop = False
            log.info(
                "job id %d: strategy %s took %.1f ms to update; its updates run on its lane from now on",
                self._job[0],
                self.name,
                took * 1000,
            )
        return out
