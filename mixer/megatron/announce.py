"""Weight versions announced ahead over a gloo group: every loader rank applies them at one step.

Megatron-LM's loop gives the plug-in no hook that every rank runs at the same moment: under
pipeline parallelism the first stage draws micro-batch 0 of an iteration long before the last
stage does, so a blocking broadcast there would deadlock (the first stage would wait for the last,
which waits for the first stage's activations). So nothing here blocks on another rank:

- every `interval` iterations (a *sync step*), each member issues an asynchronous broadcast of a
  fixed-size header from the source rank (the rank holding the session) and goes on;
- at the next sync step it waits for that broadcast, which has long finished: every rank ended the
  previous iteration, and with it the step's model-parallel reductions; a version that carries
  parameters (instance weighting, a DWM blob) sends them in a second asynchronous broadcast whose
  length the header gave, received one sync step later still;
- a received version takes effect at `max(effective_step, sync step + horizon)`, where the horizon
  is how far a DataLoader with prefetching can have drawn ahead: the same step on every rank and in
  every worker, whatever the timing.

Steps between sync steps cost nothing (no collective at all). The service's cadence (`delay`)
can announce versions far enough ahead that they land exactly on their `effective_step`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mixer.megatron.versions import VersionUpdate, poll_attachment

__all__ = ["Announced", "AnnouncedVersions"]

_HEADER = 4  # flag, version, effective_step, payload bytes


@dataclass(frozen=True, slots=True)
class Announced:
    """A version and the step from which every rank applies it."""

    update: VersionUpdate
    apply_step: int


def _pack(update: VersionUpdate) -> bytes:
    params = json.dumps(update.params, sort_keys=True).encode("utf-8")
    return len(params).to_bytes(8, "little") + params + update.blob


def _unpack(payload: bytes) -> tuple[dict[str, Any], bytes]:
    n = int.from_bytes(payload[:8], "little")
    return json.loads(payload[8 : 8 + n].decode("utf-8")), payload[8 + n :]


class AnnouncedVersions:
    """Collective over `group` (members call tick for the same iterations); src polls the attachment."""

    def __init__(
        self,
        attachment: Any,
        num_domains: int,
        *,
        interval: int = 1,
        horizon: int = 1,
        group: Any = None,
        src: int = 0,
        is_src: bool = True,
    ) -> None:
        if interval < 1 or horizon < 1:
            raise ValueError(f"interval and horizon must be >= 1, got {interval} and {horizon}")
        self.attachment = attachment if is_src else None
        self.num_domains = num_domains
        self.interval = interval
        self.horizon = horizon
        self.group = group
        self.src = src
        self.is_src = is_src
        dist = torch.distributed
        self.distributed = (
            group is not None
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size(group) > 1
        )
        self._header: tuple[Any, torch.Tensor, VersionUpdate | None] | None = None
        self._payload: tuple[Any, torch.Tensor, np.ndarray] | None = None

    def due(self, iteration: int) -> bool:
        return iteration % self.interval == 0

    def tick(self, iteration: int) -> list[Announced]:
        """Call at every iteration's first micro-batch; returns the versions received now."""
        if not self.due(iteration):
            return []
        out: list[Announced] = []
        apply_from = iteration + self.horizon
        if not self.distributed:
            update = poll_attachment(self.attachment, iteration) if self.is_src else None
            if update is not None:
                out.append(Announced(update, max(update.effective_step, apply_from)))
            return out
        if self._payload is not None:
            work, buf, head = self._payload
            work.wait()
            params, blob = _unpack(buf.numpy().tobytes())
            out.append(self._announced(head, params, blob, apply_from))
            self._payload = None
        if self._header is not None:
            work, head, local = self._header
            work.wait()
            self._header = None
            if head[0] == 1:
                size = int(head[3])
                if size == 0:
                    out.append(self._announced(head.numpy(), {}, b"", apply_from))
                else:
                    payload = _pack(local) if local is not None else b""
                    buf = torch.zeros(size, dtype=torch.uint8)
                    if self.is_src:
                        buf.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
                    w = torch.distributed.broadcast(buf, src=self.src, group=self.group, async_op=True)
                    self._payload = (w, buf, head.numpy())
        self._issue(iteration)
        return out

    def _announced(self, head: np.ndarray, params: dict[str, Any], blob: bytes, apply_from: int) -> Announced:
        weights = tuple(float(x) for x in head[_HEADER:])
        update = VersionUpdate(int(head[1]), int(head[2]), weights, params, blob)
        return Announced(update, max(update.effective_step, apply_from))

    def _issue(self, iteration: int) -> None:
        """Start the header broadcast of this sync step (the source fills it from its session)."""
        head = torch.zeros(_HEADER + self.num_domains, dtype=torch.float64)
        update = None
        if self.is_src:
            update = poll_attachment(self.attachment, iteration)
            if update is not None:
                if len(update.weights) != self.num_domains:
                    raise ValueError(
                        f"version {update.version} has {len(update.weights)} weights for {self.num_domains} domains"
                    )
                size = len(_pack(update)) if (update.params or update.blob) else 0
                # Version numbers, steps and sizes stay far below 2^53: exact in float64.
                head[:_HEADER] = torch.tensor(
                    [1.0, update.version, update.effective_step, size], dtype=torch.float64
                )
                head[_HEADER:] = torch.tensor(update.weights, dtype=torch.float64)
        work = torch.distributed.broadcast(head, src=self.src, group=self.group, async_op=True)
        self._header = (work, head, update)

    def close(self) -> None:
        """Wait for broadcasts still in flight (every member must call it at the same point)."""
        for pending in (self._header, self._payload):
            if pending is not None:
                pending[0].wait()
        self._header = self._payload = None
