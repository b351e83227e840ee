"""Group commit: one writer thread turns many concurrent appends into few transactions.

SQLite allows one writer; PostgreSQL prefers fewer, larger commits. Callers get a Future that
resolves once their append is durable; that is when a report may be acknowledged.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError

from mixer.store.records import Append, Fence, LeaseLost
from mixer.store.repository import Store

_OUTAGE = (OperationalError, InterfaceError, DisconnectionError, LeaseLost)
"""Failures of the database (or of our ownership) rather than of one job's rows: retrying each
job on its own would fail the same way."""

_STOP = object()


class GroupCommitWriter:
    """Single writer thread with a bounded batch size."""

    def __init__(self, store: Store, *, max_batch: int = 512, on_commit: Callable[[float, int], None] | None = None, fence: Fence | None = None):
        self.store = store
        self.fence = fence
        self.max_batch = max_batch
        self.on_commit = on_commit
        self._q: queue.Queue = queue.Queue()
        self._failed: dict[int, Exception] = {}
        self._thread = threading.Thread(target=self._run, name="mixer-writer", daemon=True)
        self._thread.start()

    def submit(self, item: Append, fut: Future | None = None) -> Future:
        """Queue an append; the returned future (`fut`, when given) resolves once it is durable."""
        fut = fut if fut is not None else Future()
        self._q.put((item, fut))
        return fut

    def barrier(self, job_id: int | None = None) -> Future:
        """Resolves once everything submitted before it is settled; clears a job's failed state."""
        fut: Future = Future()
        self._q.put((job_id, fut))
        return fut

    def close(self, timeout: float = 30.0) -> None:
        """Commit everything queued, then stop."""
        self._q.put(_STOP)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            first = self._q.get()
            if first is _STOP:
                return
            batch = [first]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    nxt = self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                batch.append(nxt)
            self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list) -> None:
        # After a failed commit, a job's later appends fail too until its runtime reloads
        # (barrier): committing them would leave a gap in its log.
        appends, waiting, failed = [], [], []
        for item, fut in batch:
            if not isinstance(item, Append):
                self._failed.pop(item, None)
                waiting.append((None, fut))
            elif item.job_id in self._failed:
                failed.append((fut, self._failed[item.job_id]))
            else:
                appends.append(item)
                waiting.append((item, fut))
        for fut, err in failed:
            fut.set_exception(err)
        t0 = time.perf_counter()
        try:
            if appends:
                self.store.append(appends, self.fence)
        except Exception as e:  # noqa: BLE001 - every waiter must learn the commit failed
            if isinstance(e, _OUTAGE) or len({a.job_id for a in appends}) < 2:
                self._fail(waiting, {a.job_id: e for a in appends})
            else:
                self._isolate(waiting)
            return
        if appends and self.on_commit:
            self.on_commit(time.perf_counter() - t0, len(appends))
        for _, fut in waiting:
            fut.set_result(None)

    def _isolate(self, waiting: list) -> None:
        """A shared commit failed on a row: commit each job's appends in a transaction of its
        own, so that one job's bad row cannot fail another job's reports."""
        by_job: dict[int, list[Append]] = {}
        for item, _ in waiting:
            if item is not None:
                by_job.setdefault(item.job_id, []).append(item)
        errors: dict[int, Exception] = {}
        outage: Exception | None = None
        for job_id, appends in by_job.items():
            if outage is not None:
                errors[job_id] = outage
                continue
            try:
                self.store.append(appends, self.fence)
            except Exception as e:  # noqa: BLE001 - this job's waiters learn it; the others commit
                errors[job_id] = e
                if isinstance(e, _OUTAGE):
                    outage = e
        self._fail(waiting, errors)

    def _fail(self, waiting: list, errors: dict[int, Exception]) -> None:
        """Settle the waiters: those of a job in `errors` fail (and so do its later appends,
        until its runtime reloads), the others succeed."""
        for item, fut in waiting:
            if item is not None and item.job_id in errors:
                self._failed[item.job_id] = errors[item.job_id]
                fut.set_exception(errors[item.job_id])
            else:
                fut.set_result(None)
