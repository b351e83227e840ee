"""Plain value types shared by the core and the I/O edge (store, wire, client): no logic beyond comparison."""

from __future__ import annotations

from dataclasses import dataclass, field
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
