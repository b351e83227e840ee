"""Where threads meet: the mailbox that carries results from other threads to the event loop.

Which thread does what (the hand-over is all here and in admission.py):
- The event loop admits reports whose work is cheap: a report inside an update window, a
  duplicate whose key is among its source's recent ones (`SourceKeys`, in memory), a report
  that closes a window of a strategy whose update is a few vector operations
  (`offload.LOOP_UPDATES`: static, ODM, DoReMi, until `LOOP_UPDATE_STRIKES` updates in a row
  each took over `LOOP_UPDATE_S`).
- A report that closes any other window (a strategy update: an ADO refit, an Aioli round, DWM
  training) or a duplicate older than its source's recent keys (a database read) is admitted
  on the job's lane: a serial queue run by a small thread pool. From that report on, everything of the job
  goes through its lane, in arrival order, until the lane is empty and its results are back on
  the loop; only then does the loop admit the job's reports again. So the log order is the
  arrival order, one thread at a time touches a job's engine, and replay stays bit-exact.
  While a lane works, the loop reads only values that are replaced whole (the engine's
  `current`, counters). A strategy whose update once took long computes, from then on, in an
  update process (offload.py): a computing thread would hold the interpreter lock the loop needs.
- The writer thread commits; commit outcomes come back to the loop through one mailbox
  (`Mailbox.post`), as do lane results, in the order they were posted.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

log = logging.getLogger("mixer.server")


class Mailbox:
    """Calls posted from any thread, run on the loop in the order they were posted."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._loop_thread = threading.get_ident()
        # Commit outcomes travel from the writer thread to the loop through one mailbox: one
        # loop wake-up per group commit, however many batches it settled.
        self._mail: deque[tuple[Callable, tuple]] = deque()
        self._lock = threading.Lock()
        self._armed = False

    def on_loop(self) -> bool:
        """Whether the caller runs on the loop's thread."""
        return threading.get_ident() == self._loop_thread

    def post(self, fn: Callable, *args) -> None:
        """From any thread: run fn(*args) on the loop, after everything posted before it (a
        wake-up is scheduled only if none is pending)."""
        with self._lock:
            self._mail.append((fn, args))
            if self._armed:
                return
            self._armed = True
        self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            items = list(self._mail)
            self._mail.clear()
            self._armed = False
        for fn, args in items:
            try:
                fn(*args)
            except Exception:  # one session's failure must not stop the others' acks
                log.exception("settling a batch failed")

    def when_done(self, futures: list[Future], finish: Callable[[BaseException | None], None]) -> None:
        """Call `finish(error)` on the loop once every commit future resolved: `error` is the
        first failure, or None (at once if there is nothing to wait for)."""
        if not futures:
            finish(None)
            return
        state = [len(futures), None]  # commits outstanding, the first error

        def one(f: Future) -> None:
            state[1] = state[1] or f.exception()
            state[0] -= 1
            if state[0] == 0:
                finish(state[1])

        for f in futures:
            f.add_done_callback(lambda f: self.post(one, f))
