"""Weight versions on the worker: one record type, and rank 0's broadcast to the other ranks.

All data-parallel ranks must draw step t's batch from the same weights, or the ranks of one step
would train on different mixtures. Only rank 0 holds a session with the service; at every step
boundary it polls it and broadcasts what it got, so every rank hands the same version to its
sampler before the same step. The samplers are deterministic, so they then apply it at the same
step (the version's effective_step, or the first step boundary after it arrived when late).

The broadcast goes over a gloo (CPU) group even when training uses NCCL, so it never waits on the
GPU stream: one tensor of K + 4 float64 per step (~20 us on loopback gloo), plus a pickled
(params, blob) only in the steps where a version carries instance-weighting parameters.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["VersionChannel", "VersionUpdate", "poll_attachment"]


@dataclass(frozen=True, slots=True)
class VersionUpdate:
    """A weight version as the training loop uses it (a mixer.engine.Version without service fields)."""

    version: int
    effective_step: int
    weights: tuple[float, ...]
    params: dict[str, Any] = field(default_factory=dict)
    """JSON-able parameters (instance weighting, diagnostics)."""
    blob: bytes = b""
    """Binary parameters (the DWM weighting model)."""

    @classmethod
    def of(cls, v: Any) -> VersionUpdate:
        """From a mixer.engine.Version, a VersionUpdate, or a (version, weights, effective_step) tuple."""
        if isinstance(v, VersionUpdate):
            return v
        if isinstance(v, tuple):
            version, weights, effective_step = v
            return cls(int(version), int(effective_step), tuple(float(x) for x in weights))
        return cls(
            int(v.version),
            int(v.effective_step),
            tuple(float(x) for x in np.asarray(v.weights, dtype=np.float64)),
            dict(v.params or {}),
            bytes(v.blob or b""),
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-able record (the blob as hex), for result files."""
        return {
            "version": self.version,
            "effective_step": self.effective_step,
            "weights": list(self.weights),
            "params": self.params,
            "blob": self.blob.hex(),
        }


def poll_attachment(attachment: Any, step: int) -> VersionUpdate | None:
    """Ask an attachment for a new version before `step`; never blocks unless it is strict."""
    if attachment is None:
        return None
    # poll_version(step) gives params and blob too (and lets a strict attachment wait);
    # the older poll() protocol gives (version, weights, effective_step).
    poll_version = getattr(attachment, "poll_version", None)
    got = poll_version(step) if poll_version is not None else attachment.poll()
    return None if got is None else VersionUpdate.of(got)


def _world() -> tuple[int, int]:
    dist = torch.distributed
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


class VersionChannel:
    """Every rank calls poll(step) at every step boundary and gets the same answer."""

    # Collective: all ranks must call poll() for the same steps in the same order. Rank 0's
    # attachment is the only one consulted; other ranks may pass None.

    def __init__(self, attachment: Any, num_domains: int) -> None:
        self.attachment = attachment
        self.num_domains = num_domains
        self.rank, self.world = _world()
        self.group = None
        self.active = attachment is not None
        if self.world > 1:
            # A CPU group beside the training group: broadcasting on NCCL would tie the host
            # to the GPU stream every step. new_group is itself collective (every rank builds it).
            backend = torch.distributed.get_backend()
            self.group = torch.distributed.new_group(backend="gloo") if backend != "gloo" else None
            # Whether rank 0 holds an attachment, agreed by every rank: they all poll, or none does.
            flag = torch.tensor([float(self.active)])
            torch.distributed.broadcast(flag, src=0, group=self.group)
            self.active = bool(flag.item())

    def poll(self, step: int) -> VersionUpdate | None:
        """The new version rank 0 received before `step` (the same object on every rank), or None."""
        if self.world == 1:
            return poll_attachment(self.attachment, step)
        dist = torch.distributed
        k = self.num_domains
        header = torch.zeros(4 + k, dtype=torch.float64)
        update = None
        if self.rank == 0:
            update = poll_attachment(self.attachment, step)
            if update is not None:
                if len(update.weights) != k:
                    raise ValueError(
                        f"version {update.version} has {len(update.weights)} weights for {k} domains"
                    )
                # Version numbers and steps stay far below 2^53: exact in float64.
                header[:4] = torch.tensor(
                    [1.0, update.version, update.effective_step, float(bool(update.params or update.blob))],
                    dtype=torch.float64,
                )
                header[4:] = torch.tensor(update.weights, dtype=torch.float64)
        dist.broadcast(header, src=0, group=self.group)
        if header[0] == 0:
            return None
        payload: list[Any] = [
            (json.dumps(update.params, sort_keys=True), update.blob) if update is not None else None
        ]
        if header[3] != 0:
            dist.broadcast_object_list(payload, src=0, group=self.group)
        params_json, blob = payload[0] if payload[0] is not None else ("{}", b"")
        weights: Sequence[float] = tuple(header[4:].tolist())
        return VersionUpdate(int(header[1]), int(header[2]), tuple(weights), json.loads(params_json), blob)
