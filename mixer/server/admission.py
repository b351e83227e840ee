"""Admission of reports: validate -> dedup -> assign the log position -> engine -> the group commit.

A batch of reports is decoded and validated in one pass (`validate_reports`: the per-domain
checks vectorised over the batch), then goes through the same path report by report and is
submitted as one append: one commit future, one acknowledgement message. A report's log payload
is the bytes it arrived as where the Session message kept them (`wire.ReceivedReports`), else
the report serialized again. A `Batch` owns its outcome (`Taken`): what was
taken, acknowledged as a duplicate or refused, the commits to wait for and the versions made.
Admission starts on the loop and moves to the job's lane for a report whose work is not cheap
(mailbox.py says which thread does what); the acknowledgement waits for the commit, which
carries the report and any version it produced.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import numpy as np
from sqlalchemy.exc import SQLAlchemyError

from mixer.server.errors import MixerError
from mixer.server.job import JobRuntime
from mixer.server.mailbox import Mailbox
from mixer.server.offload import Lane
from mixer.signals import Report, SignalError, validate_reports
from mixer.store import Append, LogEntry, Store
from mixer.store.writer import GroupCommitWriter
from mixer.types import Version
from mixer.v1 import mixer_pb2 as pb
from mixer.wire import reports_from_protos

log = logging.getLogger("mixer.server")

LANE_THREADS = 4
"""Threads that run the jobs' lanes (strategy updates, old-duplicate look-ups): as many jobs'
updates at once; a lane holds a thread only while it has work."""

DEFER = object()
"""Batch.admit's answer on the loop for a report that must go through the job's lane."""


@dataclass(slots=True)
class Taken:
    """What admission did with a batch of reports."""

    futures: list[Future] = field(default_factory=list)
    """Commits to wait for: this batch's, and those of in-flight reports it repeated."""
    acks: list[pb.Ack] = field(default_factory=list)
    """Reports taken or found to be duplicates, in order; sent once `futures` resolve."""
    refused: list[tuple[pb.Signals, MixerError]] = field(default_factory=list)
    versions: list[Version] = field(default_factory=list)
    """New versions, oldest first; published once `futures` resolve."""


class Batch:
    """A batch on its way through admission (on the loop, then perhaps on the job's lane)."""

    __slots__ = ("adm", "append", "checked", "found", "fut", "keys", "losses", "msgs", "rt", "taken")

    def __init__(self, adm: Admission, rt: JobRuntime, msgs: Sequence[pb.Signals]):
        self.adm = adm
        self.rt = rt
        self.msgs = msgs
        self.append = Append(rt.job.id)
        self.taken = Taken()
        self.fut: Future = Future()
        self.keys: list[tuple[int, str, int]] = []
        self.found: dict[tuple[int, str, int], int] = {}
        """Log positions of old duplicates, read from the database in one query (on the lane)."""
        self.checked: list[Report | SignalError] = []
        """Each report decoded and validated (or the error refusing it), the batch in one pass."""
        self.losses: list[Report] = []
        """Reports taken that carry per-domain loss and tokens, in order."""

    def admit_from(self, start: int, *, on_loop: bool) -> int:
        """Admit msgs from `start` on; on the loop, stop before a report that needs the lane and
        return its index (len(msgs) when all are admitted)."""
        if not self.checked:
            try:
                self.checked = validate_reports(
                    reports_from_protos(self.msgs), self.rt.spec.num_domains, max_samples=self.adm.limits.max_samples_per_report
                )
            except Exception:  # a bug must not hang the session; nothing was changed yet
                log.exception("validating a batch failed for job %s", self.rt.job.name)
                err = MixerError(grpc.StatusCode.INTERNAL, "internal error; see the server log")
                self.taken.refused.extend((msg, err) for msg in self.msgs[start:])
                return len(self.msgs)
        for i in range(start, len(self.msgs)):
            msg = self.msgs[i]
            try:
                if self.admit(i, on_loop) is DEFER:
                    return i
            except MixerError as e:
                self.taken.refused.append((msg, e))
            except Exception:  # a bug must not hang the session; the report is not in the log
                log.exception("ingest failed for job %s", self.rt.job.name)
                self.adm.poison(self.rt)  # its engine may be half-updated: rebuild it from the log (later reports: UNAVAILABLE)
                self.taken.refused.append((msg, MixerError(grpc.StatusCode.INTERNAL, "internal error; see the server log")))
        return len(self.msgs)

    def submit(self) -> None:
        """Hand what the batch took to the group commit (from the loop or the lane)."""
        if self.losses:
            self.rt.last_loss = _last_loss(self.rt.last_loss, self.losses, self.rt.spec.num_domains)
        if self.append.signals:
            fut, adm = self.fut, self.adm
            adm.writer.submit(self.append, fut)
            fut.add_done_callback(lambda f, rt=self.rt, keys=self.keys: adm.settled(rt, keys, f))
            self.taken.futures.append(fut)

    def prefetch(self, start: int) -> None:
        """On the lane: the log positions of the batch's re-sent reports older than their source's
        recent keys, in one query per source (a burst of old re-sends costs a few reads, not one each)."""
        rt = self.rt
        wanted: dict[str, list[tuple[int, int]]] = {}
        for msg in self.msgs[start:]:
            mark = rt.marks.get(msg.source)
            if mark is None or (msg.step, msg.seq) > mark:
                continue
            keys = rt.recent.get(msg.source)
            if keys is None or not keys.covers(msg.step, msg.seq):
                wanted.setdefault(msg.source, []).append((msg.step, msg.seq))
        for source, keys in wanted.items():
            if len(keys) < 2:
                continue  # one look-up: admit's own
            try:
                for (step, seq), log_seq in self.adm.store.find_signals(rt.job.id, source, keys).items():
                    self.found[step, source, seq] = log_seq
            except SQLAlchemyError:
                return  # admit reads them one by one and reports the failure

    def admit(self, i: int, on_loop: bool):
        """Report i: refuse it (MixerError), ack it as a duplicate, or take it into the batch's
        append; on the loop, DEFER a report that needs the lane (nothing is changed then)."""
        msg = self.msgs[i]
        report = self._check(i)
        mark = self.rt.marks.get(report.source)
        if mark is not None and (report.step, report.seq) <= mark:
            return self._duplicate(report, mark, on_loop)
        eng = self.rt.engine
        if on_loop and report.step >= eng.next_update_step and not getattr(eng.strategy, "on_loop", False):
            return DEFER  # it closes a window: the strategy update (not a cheap one) runs on the lane
        payloads = getattr(self.msgs, "payloads", None)  # a ReceivedReports: the bytes each arrived as
        self._take(report, payloads[i] if payloads is not None else msg.SerializeToString())
        return None

    def _check(self, i: int) -> Report:
        """Report i, if the job takes reports and it is valid and within the job's step window."""
        rt, reject = self.rt, self.adm.reject
        if rt.job.source_job:
            reject("derived")
            raise MixerError(grpc.StatusCode.FAILED_PRECONDITION, f"job {rt.job.name!r} is derived from {rt.job.source_job!r} (a replay); it takes no reports")
        if rt.job.status == "finished":
            reject("finished")
            raise MixerError(grpc.StatusCode.FAILED_PRECONDITION, f"job {rt.job.name!r} is finished; it takes no more reports")
        if rt.poisoned:
            raise MixerError(grpc.StatusCode.UNAVAILABLE, f"job {rt.job.name!r} is reloading after a database failure; reconnect and resend")
        report = self.checked[i]
        if isinstance(report, SignalError):
            reject("invalid")
            raise MixerError(grpc.StatusCode.INVALID_ARGUMENT, f"report rejected: {report}")
        eng = rt.engine
        lag = rt.spec.cadence.max_step_lag
        if eng.max_step >= 0 and report.step < eng.max_step - lag:
            reject("stale")
            raise MixerError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"report rejected: step: {report.step} is more than cadence.max_step_lag={lag} steps behind the newest step {eng.max_step}",
            )
        ahead = rt.spec.cadence.step_ahead
        newest = max(eng.max_step, 0)
        if report.step > newest + ahead:
            # Far ahead would move the job's clock: honest reports would then be too far behind
            # and new versions would take effect at a step no worker reaches.
            reject("ahead")
            raise MixerError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"report rejected: step: {report.step} is more than cadence.max_step_ahead={ahead} steps ahead of the newest step {newest}",
            )
        return report

    def _duplicate(self, report: Report, mark: tuple[int, int], on_loop: bool):
        """A duplicate: acknowledged (once the original is durable) with the original's place."""
        rt, taken, key = self.rt, self.taken, report.key
        if key in rt.inflight:
            other, seq = rt.inflight[key]
            if other is not self.fut and other not in taken.futures:
                taken.futures.append(other)
        else:
            keys = rt.recent.get(report.source)
            if keys is not None and keys.covers(report.step, report.seq):
                seq = keys.find(report.step, report.seq)
                where = "memory"
            elif on_loop:
                return DEFER  # the database knows: read it on the lane, never on the loop
            elif key in self.found:
                seq, where = self.found[key], "database"
            else:
                try:
                    seq = self.adm.store.has_signal(rt.job.id, *key)
                except SQLAlchemyError:
                    raise MixerError(grpc.StatusCode.UNAVAILABLE, "the database is unavailable; retry later") from None
                where = "database"
            if self.adm.metrics is not None:
                self.adm.metrics.duplicate_lookup(where)
            if seq is None:
                self.adm.reject("out_of_order")
                raise MixerError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"report rejected: source {report.source!r} already reported step {mark[0]} seq {mark[1]}; "
                    f"step {report.step} seq {report.seq} is out of order and not in the log",
                )
        rt.duplicate_count += 1
        taken.acks.append(pb.Ack(step=report.step, seq=report.seq, duplicate=True, log_seq=seq, source=report.source))
        return None

    def _take(self, report: Report, payload: bytes | memoryview) -> None:
        """A new report: through the engine, into the append, acknowledged once durable."""
        rt, eng, metrics = self.rt, self.rt.engine, self.adm.metrics
        seq = rt.next_seq
        t0 = time.perf_counter()
        try:
            version = eng.ingest(report, seq)  # refuses (and changes nothing) if its state would turn non-finite
        except SignalError as e:
            self.adm.reject("invalid")
            raise MixerError(grpc.StatusCode.INVALID_ARGUMENT, f"report rejected: {e}") from None
        if metrics is not None and version is not None:
            metrics.observe_update(rt.spec.strategy.name, time.perf_counter() - t0)
        rt.next_seq += 1
        rt.marks[report.source] = (report.step, report.seq)
        rt.remember(report.source, report.step, report.seq, seq)
        rt.report_count += 1
        samples = report.num_samples
        rt.sample_count += samples
        if report.domain_token_count is not None and report.domain_loss_sum is not None:
            self.losses.append(report)  # the live per-domain loss, set once per batch (submit)
        _track_applied(rt, report)
        append = self.append
        append.signals.append(LogEntry(seq, report.step, report.source, report.seq, report.applied_version, samples, payload))
        if version is not None:
            append.versions.append(version)
            self.taken.versions.append(version)
            if version.version % rt.spec.cadence.snapshot_every == 0:
                append.snapshot = (version.version, seq, eng.snapshot())  # a batch keeps its newest
        rt.inflight[report.key] = (self.fut, seq)
        self.keys.append(report.key)
        self.taken.acks.append(pb.Ack(step=report.step, seq=report.seq, duplicate=False, log_seq=seq, source=report.source))


def _last_loss(old: np.ndarray | None, reports: list[Report], k: int) -> np.ndarray:
    """The live per-domain loss (page, metrics) after these reports: per domain, loss over tokens
    in the newest report with tokens there (else the old value, else 0). A new array, replaced
    whole: readers on other threads never see one half-updated. A newest report with tokens in
    every domain decides alone (one division per batch, the common case)."""
    last = reports[-1]
    if last.domain_token_count.min() > 0:
        return last.domain_loss_sum / last.domain_token_count
    out = np.zeros(k) if old is None else old.copy()
    for r in reports:
        tokens = r.domain_token_count
        np.divide(r.domain_loss_sum, tokens, out=out, where=tokens > 0)
    return out


def _track_applied(rt: JobRuntime, report: Report) -> None:
    v = report.applied_version
    if v <= rt.applied_max:  # versions only grow: the first report applying v is the one to time
        return
    rt.applied_max = v
    if v == rt.engine.current.version:
        rt.applied_lag = max(0, report.step - rt.engine.current.effective_step)


class Admission:
    """Admits batches of reports for the live jobs of one server, on the loop or on their lanes."""

    def __init__(self, store: Store, writer: GroupCommitWriter, limits, metrics, mail: Mailbox, poison: Callable[[JobRuntime], None]):
        self.store = store
        self.writer = writer
        self.limits = limits
        self.metrics = metrics
        self.mail = mail
        self.poison = poison
        """Drop a runtime whose memory may differ from the database (from any thread)."""
        self._lanes = ThreadPoolExecutor(max_workers=LANE_THREADS, thread_name_prefix="mixer-lane")

    def begin(self, rt: JobRuntime, msgs: Sequence[pb.Signals], on_taken: Callable[[Taken], None]) -> None:
        """Admit reports, in order: each is taken, recognized as a duplicate or refused on its own;
        everything taken goes to the group commit as one append. `on_taken(taken)` runs on the
        loop once admission is over: at once, or once the job's lane is through with the batch.
        The caller sends the refusals then, and the acks once `when_settled` says so."""
        batch = Batch(self, rt, msgs)
        if rt.offloaded:  # the lane has the job's earlier reports: these go after them
            self._offload(batch, 0, on_taken)
            return
        i = batch.admit_from(0, on_loop=True)
        if i < len(msgs):
            self._offload(batch, i, on_taken)
            return
        batch.submit()
        on_taken(batch.taken)

    def _offload(self, batch: Batch, start: int, on_taken: Callable[[Taken], None]) -> None:
        """Admit the rest of a batch on the job's lane; its result comes back through the mailbox."""
        rt = batch.rt
        if rt.lane is None:
            rt.lane = Lane(self._lanes)
        rt.offloaded += 1

        def back() -> None:  # on the loop, in the order the lane finished its batches
            rt.offloaded -= 1
            on_taken(batch.taken)

        def work() -> None:  # on a lane thread
            try:
                batch.prefetch(start)
                batch.admit_from(start, on_loop=False)
                batch.submit()
            finally:
                self.mail.post(back)

        rt.lane.submit(work)

    def when_settled(self, rt: JobRuntime, taken: Taken, done: Callable[[MixerError | None], None]) -> None:
        """Call `done(None)` on the loop once a batch's reports are durable (its versions pushed to
        watchers first), or `done(error)` if a commit failed (the client keeps its reports)."""

        def finish(err: BaseException | None) -> None:
            # The futures hold this closure (through their callbacks) and `taken` holds them: break
            # the cycle so the batch is freed by reference counting, not by the cyclic collector
            # (whose full collections over a busy heap stall the loop).
            taken.futures.clear()
            if err is not None:
                done(MixerError(grpc.StatusCode.UNAVAILABLE, f"the database did not commit the report ({type(err).__name__}); retry later"))
                return
            now = time.time()  # durable from now: what pushes are timed from (mixer_version_push_lag_seconds)
            for version in taken.versions:
                rt.note_created(version, now)
                rt.publish(version)
            done(None)

        self.mail.when_done(taken.futures, finish)

    def settled(self, rt: JobRuntime, keys: list, fut: Future) -> None:
        # Runs on the writer thread: only plain dict/flag updates here.
        for key in keys:
            rt.inflight.pop(key, None)
        if fut.exception() is not None:
            self.poison(rt)

    def reject(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.rejected(reason)

    def close(self) -> None:
        """Stop the lanes' threads once their work is done (after the server stopped taking reports)."""
        self._lanes.shutdown(wait=True)
