"""Live-weight mixture sampling: a deterministic credit interleaver over one dataset per domain.

The interleaver is a smooth weighted round-robin: before each draw every domain gains its weight
as credit; the domain with the largest credit is picked and loses 1; ties go to the lowest index.
Credits persist across weight changes, so frequent small updates are not biased towards the
first domains (restarting the counters per window is what makes Megatron's helper biased).

Credits are exact integers (weights quantised to multiples of 1/_SCALE by largest remainder), so
the sequence does not depend on float summation order and the state round-trips exactly.

Guarantees (tested in tests/megatron/test_megatron_sampler.py):
- a zero-weight domain is never picked, even if it still holds credit from an earlier version;
- with fixed weights w, over any window of n consecutive draws |count_i - n w_i| <= 1 for two
  domains and < 2 for more (measured on thousands of random weight vectors, not proven). "Within 1
  for every window" cannot be promised for three or more domains: for generic weights it would be
  a balanced word with distinct rates, which Fraenkel's conjecture (proven up to 7 letters) rules
  out; small-denominator weights such as (0.5, 0.3, 0.2) do stay within 1;
- when every w_i is a multiple of 1/m (e.g. m = global batch size) and credits start at zero,
  every aligned block of m draws holds exactly m w_i draws of domain i;
- the same state and the same set_weights calls give the same sequence (resume is exact).
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

__all__ = [
    "SAMPLE_ID_SHIFT",
    "FingerprintMismatchError",
    "MixtureDataset",
    "MixtureSampler",
    "StepBatchSampler",
    "fingerprint",
    "make_sample_id",
    "quantize_weights",
    "split_sample_id",
]

# 2^10 3^4 5^3 7^2 11 13: weights k/m for every m up to 16 (and 20, 32, 64, 100, 1000, ...) are exact.
_SCALE = 2**10 * 3**4 * 5**3 * 7**2 * 11 * 13
SAMPLE_ID_SHIFT = 40
_STATE_FORMAT = 1


class FingerprintMismatchError(ValueError):
    """A sampler state belongs to another job spec; pass force=True to load it anyway."""


def fingerprint(obj: Any) -> str:
    """A stable hex digest of a JSON-able object (e.g. the job spec), for MixtureSampler."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def make_sample_id(domain: int, index: int) -> int:
    """Global int64 sample id: domain in the high bits, index within the domain in the low 40."""
    return (int(domain) << SAMPLE_ID_SHIFT) | int(index)


def split_sample_id(sample_id: int) -> tuple[int, int]:
    """Inverse of make_sample_id."""
    return int(sample_id) >> SAMPLE_ID_SHIFT, int(sample_id) & ((1 << SAMPLE_ID_SHIFT) - 1)


def _normalize(weights: Sequence[float], num_domains: int) -> np.ndarray:
    """Validate and normalise weights onto the simplex."""
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (num_domains,):
        raise ValueError(f"expected {num_domains} weights, got shape {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"weights must be finite and non-negative, got {w.tolist()}")
    total = w.sum()
    if total <= 0:
        raise ValueError("at least one weight must be positive")
    return w / total


def quantize_weights(weights: Sequence[float]) -> np.ndarray:
    """Integer weights summing to _SCALE (largest remainder); positive weights keep at least 1."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    raw = w * _SCALE
    q = np.floor(raw).astype(np.int64)
    q[(w > 0) & (q == 0)] = 1
    diff = int(_SCALE - q.sum())
    positive = np.flatnonzero(w > 0)
    if diff > 0:
        # Largest remainders first; the stable sort breaks ties by the lowest index.
        order = positive[np.argsort(-(raw[positive] - np.floor(raw[positive])), kind="stable")]
        for k in range(diff):
            q[order[k % len(order)]] += 1
    elif diff < 0:
        order = positive[np.argsort(-q[positive], kind="stable")]
        for k in range(-diff):
            q[order[k % len(order)]] -= 1
    return q


class MixtureSampler:
    """Deterministic interleaver with persistent per-domain credits and versioned live weights."""

    def __init__(
        self,
        num_domains: int,
        global_batch_size: int,
        weights: Sequence[float],
        *,
        fingerprint: str,
        dp_rank: int = 0,
        dp_size: int = 1,
        dataset_lengths: Sequence[int] | None = None,
        version: int = 0,
    ) -> None:
        if num_domains <= 0 or global_batch_size <= 0:
            raise ValueError("num_domains and global_batch_size must be positive")
        if dp_size <= 0 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"bad data-parallel rank {dp_rank} of {dp_size}")
        if global_batch_size % dp_size:
            raise ValueError(f"global_batch_size {global_batch_size} is not divisible by dp_size {dp_size}")
        if dataset_lengths is not None and (len(dataset_lengths) != num_domains or min(dataset_lengths) <= 0):
            raise ValueError(f"dataset_lengths must hold {num_domains} positive lengths")
        self.num_domains = num_domains
        self.global_batch_size = global_batch_size
        self.fingerprint = fingerprint
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.dataset_lengths = None if dataset_lengths is None else [int(n) for n in dataset_lengths]
        self._weights = _normalize(weights, num_domains)
        self._units = quantize_weights(self._weights)
        self._version = version
        self._step = 0
        self._credits = np.zeros(num_domains, dtype=np.int64)
        self._drawn = np.zeros(num_domains, dtype=np.int64)
        # Pending versions as (effective_step, version, weights); applied at a step boundary.
        self._pending: list[tuple[int, int, list[float]]] = []
        self._applied: list[tuple[int, int]] = [(version, 0)]

    @property
    def step(self) -> int:
        """The step whose batch the next call to next_global_batch draws."""
        return self._step

    @property
    def version(self) -> int:
        """The weight version in force for the last drawn batch (or the next, before any draw)."""
        return self._version

    @property
    def weights(self) -> np.ndarray:
        """The normalised weights in force."""
        return self._weights.copy()

    @property
    def applied(self) -> list[tuple[int, int]]:
        """(version, step at which it took effect) for every version applied so far."""
        return list(self._applied)

    @property
    def drawn(self) -> np.ndarray:
        """How many samples each domain has contributed so far."""
        return self._drawn.copy()

    def set_weights(self, weights: Sequence[float], version: int, effective_step: int) -> bool:
        """Queue a weight version for effective_step; returns False for a stale or repeated version."""
        # A version whose effective_step has passed applies at the next step boundary. Credits
        # and cursors are kept: only the rate at which credit accrues changes.
        w = _normalize(weights, self.num_domains)
        latest = max([self._version, *(v for _, v, _ in self._pending)])
        if version <= latest:
            return False
        self._pending.append((int(effective_step), int(version), w.tolist()))
        self._pending.sort(key=lambda p: (p[0], p[1]))
        return True

    def _apply_due(self, step: int) -> None:
        """Apply the newest pending version due at step; drop any older pending ones."""
        due = [p for p in self._pending if p[0] <= step]
        if not due:
            return
        _, version, weights = max(due, key=lambda p: p[1])
        self._pending = [p for p in self._pending if p[1] > version]
        self._weights = np.asarray(weights, dtype=np.float64)
        self._units = quantize_weights(self._weights)
        self._version = version
        self._applied.append((version, step))

    def _draw(self) -> int:
        """One smooth-weighted-round-robin draw; returns the domain index."""
        self._credits += self._units
        # Zero-weight domains are masked: their old credit must never make them win.
        masked = np.where(self._units > 0, self._credits, np.iinfo(np.int64).min)
        domain = int(np.argmax(masked))  # argmax returns the first maximum: lowest index wins ties
        self._credits[domain] -= _SCALE
        return domain

    def next_global_batch(self, step: int) -> list[tuple[int, int]]:
        """The whole data-parallel batch of step as (domain, index within that domain's dataset)."""
        if step != self._step:
            raise ValueError(f"sampler is at step {self._step}, asked for step {step}")
        self._apply_due(step)
        batch = []
        for _ in range(self.global_batch_size):
            domain = self._draw()
            cursor = int(self._drawn[domain])
            self._drawn[domain] += 1
            if self.dataset_lengths is not None:
                cursor %= self.dataset_lengths[domain]
            batch.append((domain, cursor))
        self._step += 1
        return batch

    def rank_slice(self, batch: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        """This data-parallel rank's contiguous share of a global batch."""
        per_rank = len(batch) // self.dp_size
        return list(batch[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank])

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the exact sequence; plain Python types only."""
        return {
            "format": _STATE_FORMAT,
            "fingerprint": self.fingerprint,
            "num_domains": self.num_domains,
            "global_batch_size": self.global_batch_size,
            "step": self._step,
            "credits": self._credits.tolist(),
            "drawn": self._drawn.tolist(),
            "weights": self._weights.tolist(),
            "version": self._version,
            "pending": [list(p) for p in self._pending],
            "applied": [list(a) for a in self._applied],
        }

    def load_state_dict(self, state: dict[str, Any], force: bool = False) -> None:
        """Restore a state; a different fingerprint raises FingerprintMismatchError unless force."""
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"unknown sampler state format {state.get('format')!r}")
        if state["fingerprint"] != self.fingerprint and not force:
            raise FingerprintMismatchError(
                f"sampler state was saved for job spec {state['fingerprint'][:16]}..., this job is "
                f"{self.fingerprint[:16]}...; resuming would change the data mixture "
                "(pass force=True to load it anyway)"
            )
        if state["num_domains"] != self.num_domains:
            raise ValueError(f"state has {state['num_domains']} domains, sampler has {self.num_domains}")
        if state["global_batch_size"] != self.global_batch_size and not force:
            raise ValueError(
                f"state has global batch size {state['global_batch_size']}, sampler has "
                f"{self.global_batch_size} (pass force=True to load it anyway)"
            )
        self._step = int(state["step"])
        self._credits = np.asarray(state["credits"], dtype=np.int64)
        self._drawn = np.asarray(state["drawn"], dtype=np.int64)
        self._weights = _normalize(state["weights"], self.num_domains)
        self._units = quantize_weights(self._weights)
        self._version = int(state["version"])
        self._pending = [(int(e), int(v), list(w)) for e, v, w in state["pending"]]
        self._applied = [(int(v), int(s)) for v, s in state["applied"]]


class MixtureDataset(Dataset):
    """Map-style view over one Megatron dataset per domain, keyed by (domain, index)."""

    def __init__(self, datasets: Sequence[Any]) -> None:
        self.datasets = list(datasets)

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)

    def lengths(self) -> list[int]:
        """Each domain's dataset length, for MixtureSampler(dataset_lengths=...)."""
        return [len(d) for d in self.datasets]

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        """A Megatron sample plus dataset_id (the domain) and sample_id (make_sample_id)."""
        domain, index = key
        item = self.datasets[domain][index]
        sample = {k: item[k] for k in ("tokens", "labels", "loss_mask", "position_ids")}
        sample["dataset_id"] = torch.tensor(domain, dtype=torch.int64)
        sample["sample_id"] = torch.tensor(make_sample_id(domain, index), dtype=torch.int64)
        return sample

    def batch(self, keys: Sequence[tuple[int, int]]) -> dict[str, torch.Tensor]:
        """Load and collate the samples of one step (synchronously, in this process)."""
        return default_collate([self[k] for k in keys])


class StepBatchSampler:
    """A DataLoader batch_sampler yielding this rank's keys, step after step."""

    # The sampler runs in the main process (DataLoader iterates batch samplers there) and hands
    # key lists to the workers, so workers never hold weights. With num_workers=W and
    # prefetch_factor=P the loader draws about W*P steps ahead of training: a version is applied
    # exactly at its effective_step only if it reaches the sampler that many steps early; later
    # ones land at the first step not yet drawn (recorded in sampler.applied). For a checkpoint
    # take state_before(next step to train), not the live state, which is ahead by the prefetch.

    def __init__(self, sampler: MixtureSampler, num_steps: int, history: int = 64) -> None:
        self.sampler = sampler
        self.end_step = sampler.step + num_steps
        self._states: deque[tuple[int, dict[str, Any]]] = deque(maxlen=history)

    def __len__(self) -> int:
        return max(0, self.end_step - self.sampler.step)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        while self.sampler.step < self.end_step:
            step = self.sampler.step
            self._states.append((step, self.sampler.state_dict()))
            yield self.sampler.rank_slice(self.sampler.next_global_batch(step))

    def state_before(self, step: int) -> dict[str, Any]:
        """The sampler state just before drawing step (for a checkpoint taken after step - 1)."""
        if step == self.sampler.step:
            return self.sampler.state_dict()
        for s, state in self._states:
            if s == step:
                return state
        raise KeyError(f"no sampler snapshot for step {step} (history too short?)")
