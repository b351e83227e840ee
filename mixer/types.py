"""Plain value types shared by the core and the I/O edge (store, wire, client): no logic beyond comparison."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np


@dataclass(slots=True)
class Version:
    """A weight version: what workers apply from `effective_step` on."""

    version: int
    effective_step: int
    weights: np.ndarray
    params: dict[str, Any] = field(default_factory=dict)
    blob: bytes = b""
    trigger_step: int = -1
    """Step of the report whose arrival triggered this update (-1 for the initial version)."""
    log_seq: int = -1
    """Log position of that report (-1 for the initial version)."""

    def __eq__(self, other: object) -> bool:
        """Every field equal (the weights element by element); a ServedVersion equals only a ServedVersion."""
        if other.__class__ is not self.__class__:
            return NotImplemented
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
                if np.shape(a) != np.shape(b) or not np.array_equal(a, b):
                    return False
            elif a != b:
                return False
        return True

    def same_as(self, other: Version) -> bool:
        """Bit-exact equality of everything a worker or a replay can observe."""
        return (
            self.version == other.version
            and self.effective_step == other.effective_step
            and self.weights.shape == other.weights.shape
            and np.array_equal(self.weights, other.weights)
            and self.params == other.params
            and self.blob == other.blob
        )


@dataclass(slots=True, eq=False)  # Version's __eq__: field by field, arrays element by element
class ServedVersion(Version):
    """A weight version as the service serves it: the version plus the job it belongs to, the
    domain order of `weights`, and when it was committed."""

    job: str = ""
    domains: tuple[str, ...] = ()
    created_at: float = 0.0
    """Unix seconds of the commit."""


@dataclass(frozen=True, slots=True)
class JobInfo:
    """A job as the service describes it: its record and, where it is loaded, its live state.
    The spec itself is `JobSpec.from_json(info.spec_json)`."""

    name: str
    spec_json: str
    fingerprint: str
    domains: tuple[str, ...]
    strategy: str
    weighting: str
    latest_version: int = -1
    """The newest version (-1 when none)."""
    max_step: int = -1
    """Highest step reported so far (-1 when none)."""
    report_count: int = 0
    created_at: float = 0.0
    """Unix seconds."""
    source_job: str = ""
    """For a derived job (a counterfactual replay): the job it was derived from; "" otherwise."""
    status: str = "active"
    """"active" or "finished"."""


@dataclass(frozen=True, slots=True)
class ReportAck:
    """The service's answer to one report: where it went, and the newest version after it."""

    step: int
    seq: int
    source: str
    duplicate: bool
    """True when the report was already in the log and was dropped."""
    log_seq: int
    """Position of the report in the job's log."""
    latest: ServedVersion | None
    """The newest version after this report (None when the job has none)."""
