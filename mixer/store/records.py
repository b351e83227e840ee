"""The shapes that go into the store and come out of it: a job's record, a log entry as admission
hands it to the group commit and as it is read back, an append (one unit of a group commit) and
the fence a lease holder's commits carry."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from mixer.types import Version


class LogEntry(NamedTuple):
    """A report's row of the log (the signals table) as admission hands it to the group commit;
    `Store.append` adds the job and the time."""

    seq: int
    """Its position in the job's log."""
    step: int
    source: str
    source_seq: int
    applied_version: int
    num_samples: int
    payload: bytes | memoryview
    """The report as it arrived (protobuf Signals)."""


@dataclass(slots=True)
class JobRecord:
    id: int
    name: str
    spec_json: str
    fingerprint: str
    strategy: str
    created_at: float
    source_job: str | None
    status: str = "active"


@dataclass(slots=True)
class SignalRecord:
    seq: int
    step: int
    source: str
    source_seq: int
    applied_version: int
    num_samples: int
    received_at: float
    payload: bytes


class LeaseLost(RuntimeError):
    """This server no longer owns a job it tried to write (high availability)."""


@dataclass(frozen=True, slots=True)
class Fence:
    """Commits of a lease holder check, in the same transaction, that it still owns the job."""

    owner: str
    ttl: float


@dataclass(slots=True)
class Append:
    """One unit of a group commit: a job's new log entries, versions and snapshot."""

    job_id: int
    signals: list[LogEntry] = field(default_factory=list)
    versions: list[Version] = field(default_factory=list)
    snapshot: tuple[int, int, bytes] | None = None
