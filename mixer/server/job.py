"""One live job's state: its engine, log position, per-source marks and keys, recent versions, watchers.

Only the loop (or the job's lane, while it has the job; see mailbox.py) changes it. The newest
log keys per source (`SourceKeys`) answer a re-sent report without the database; the newest
committed versions (`RecentVersions`) answer GetWeights without it.
"""

from __future__ import annotations

import asyncio
import bisect
from array import array
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from mixer.engine import Engine
from mixer.server.offload import Lane
from mixer.spec import JobSpec
from mixer.store import JobRecord
from mixer.types import Version
from mixer.v1 import mixer_pb2 as pb
from mixer.wire import job_to_proto, version_to_proto

KEYS_KEPT = 4096
"""Per source, the newest log keys kept in memory: a re-sent report among them is answered
without the database (a reconnecting Reporter re-sends at most its buffer, 4096 by default)."""
VERSIONS_KEPT = 256
"""Per job, the newest committed versions kept in memory for GetWeights (by number, at a step)."""
VERSION_BYTES_KEPT = 64 << 20
"""... and at most this many bytes of their weights and blobs (a weighting model's tensors)."""


@dataclass(frozen=True, slots=True)
class StoredJob:
    """A job this server has not loaded, as the database has it: its newest stored version, newest
    step and report count (not -1 and 0 as if it had none). Both ListJobs and the JSON API show it."""

    job: JobRecord
    spec: JobSpec
    newest: Version | None
    report_count: int
    max_step: int

    @classmethod
    def read(cls, store, rec: JobRecord) -> StoredJob:
        """Two reads of the database: call it on a thread, never on the loop."""
        newest = store.version(rec.id)
        count, _, max_step = store.log_stats(rec.id)
        return cls(rec, JobSpec.from_json(rec.spec_json), newest[0] if newest else None, count, max_step)

    def to_proto(self) -> pb.Job:
        latest = self.newest.version if self.newest is not None else -1
        return job_to_proto(
            self.job, self.spec, latest_version=latest, max_step=self.max_step, report_count=self.report_count
        )


class SourceKeys:
    """A source's newest log keys in log order (which is (step, seq) order: a source's new report
    must lie above its mark): (step, seq) -> log position, for answering re-sent reports."""

    __slots__ = ("logs", "seqs", "steps")

    def __init__(self) -> None:
        self.steps, self.seqs, self.logs = array("q"), array("q"), array("q")

    def add(self, step: int, seq: int, log_seq: int) -> None:
        self.steps.append(step)
        self.seqs.append(seq)
        self.logs.append(log_seq)
        if len(self.steps) >= 2 * KEYS_KEPT:  # drop the older half: amortised O(1) per key
            del self.steps[:KEYS_KEPT], self.seqs[:KEYS_KEPT], self.logs[:KEYS_KEPT]

    def covers(self, step: int, seq: int) -> bool:
        """Whether every key of this source from (step, seq) on is here (so one missing is not in the log)."""
        return bool(self.steps) and (step, seq) >= (self.steps[0], self.seqs[0])

    def find(self, step: int, seq: int) -> int | None:
        i = bisect.bisect_left(self.steps, step)
        n = len(self.steps)
        while i < n and self.steps[i] == step:
            if self.seqs[i] == seq:
                return self.logs[i]
            i += 1
        return None


class RecentVersions:
    """A job's newest committed versions, oldest first, with their commit times. Effective steps
    never decrease from one version to the next, so the version in force at a step is found by
    bisection; one older than those kept is looked up in the database."""

    __slots__ = ("complete", "created", "nbytes", "steps", "versions")

    def __init__(self, rows: list[tuple[Version, float]]):
        self.versions: deque[Version] = deque()
        self.created: deque[float] = deque()
        self.steps: deque[int] = deque()
        self.nbytes = 0
        self.complete = bool(rows) and rows[0][0].version == 0
        """Whether the first version kept is version 0 (nothing older exists)."""
        for v, created in rows:
            self.add(v, created)

    def add(self, v: Version, created: float) -> None:
        if self.versions and v.version <= self.versions[-1].version:
            return
        self.versions.append(v)
        self.created.append(created)
        self.steps.append(v.effective_step)
        self.nbytes += v.weights.nbytes + len(v.blob)
        while len(self.versions) > 1 and (
            len(self.versions) > VERSIONS_KEPT or self.nbytes > VERSION_BYTES_KEPT
        ):
            old = self.versions.popleft()
            self.created.popleft()
            self.steps.popleft()
            self.nbytes -= old.weights.nbytes + len(old.blob)
            self.complete = False

    @property
    def newest(self) -> tuple[Version, float] | None:
        return (self.versions[-1], self.created[-1]) if self.versions else None

    def created_at(self, number: int) -> float | None:
        if not self.versions or not self.versions[0].version <= number <= self.versions[-1].version:
            return None
        i = number - self.versions[0].version  # versions are consecutive
        return self.created[i] if 0 <= i < len(self.versions) and self.versions[i].version == number else None

    def find(
        self, *, number: int | None = None, step: int | None = None
    ) -> tuple[Version, float] | None | bool:
        """The version with this number, or the one in force at `step`; None if there is none,
        False if the answer lies before the versions kept (ask the database)."""
        if not self.versions:
            return False
        first = self.versions[0].version
        if number is not None:
            if number > self.versions[-1].version or number < 0:
                return None
            if number < first:
                return None if self.complete else False
            i = number - first
            return (self.versions[i], self.created[i]) if self.versions[i].version == number else False
        i = bisect.bisect_right(self.steps, step) - 1
        if i < 0:
            return None if self.complete else False
        return self.versions[i], self.created[i]


@dataclass
class JobRuntime:
    job: JobRecord
    spec: JobSpec
    engine: Engine
    next_seq: int
    marks: dict[str, tuple[int, int]]
    versions: RecentVersions
    report_count: int = 0
    sample_count: int = 0
    duplicate_count: int = 0
    inflight: dict[tuple[int, str, int], tuple[Future, int]] = field(default_factory=dict)
    recent: dict[str, SourceKeys] = field(default_factory=dict)
    """Per source, its newest log keys (re-sent reports among them need no database read)."""
    watchers: set[asyncio.Queue] = field(default_factory=set)
    """WatchWeights streams: each gets every version."""
    listeners: set[Callable[[Version], None]] = field(default_factory=set)
    """Sessions: each is called with every version (on the loop) and sends only the newest."""
    last_loss: np.ndarray | None = None
    applied_lag: int = 0
    """Steps between a version's effective step and the step a worker first reported applying it."""
    applied_max: int = -1
    """The newest version any worker reported applying."""
    poisoned: bool = False
    sessions: int = 0
    lane: Lane | None = None
    offloaded: int = 0
    """Batches handed to the lane whose results are not back on the loop (touched on the loop only)."""
    pushed: pb.WeightVersion | None = None
    """The message of the newest version sent to a session (`push_message`), built once for all
    the job's sessions (on the loop only)."""

    def push_message(self, v: Version) -> pb.WeightVersion:
        """Version v as sessions receive it: the message is built once per version, however many
        sessions (a job's ranks) it goes to."""
        msg = self.pushed
        if msg is None or msg.version != v.version:
            msg = self.pushed = version_to_proto(self.job.name, v, self.spec.domain_names, self.created_at(v.version))
        return msg

    def to_proto(self) -> pb.Job:
        return job_to_proto(
            self.job,
            self.spec,
            latest_version=self.engine.current.version,
            max_step=self.engine.max_step,
            report_count=self.report_count,
        )

    def subscribe(self) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(maxsize=1024)
        self.watchers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        self.watchers.discard(q)

    def created_at(self, number: int) -> float:
        """When a version was committed (0.0 if it is not among those kept)."""
        return self.versions.created_at(number) or 0.0

    def note_created(self, v: Version, at: float) -> None:
        """Keep a committed version and when its commit ended (what GetWeights and pushes serve as
        created_at; the database's row holds the time its transaction was built, earlier by the
        commit's duration)."""
        self.versions.add(v, at)

    def publish(self, v: Version) -> None:
        """On the loop, once v is committed: to every session and watcher of the job."""
        for listen in list(self.listeners):
            listen(v)
        for q in list(self.watchers):
            if q.full():  # a reader that stopped reading loses its oldest push, never blocks ingest
                q.get_nowait()
            q.put_nowait(v)

    def remember(self, source: str, step: int, seq: int, log_seq: int) -> None:
        keys = self.recent.get(source)
        if keys is None:
            keys = self.recent[source] = SourceKeys()
        keys.add(step, seq, log_seq)
