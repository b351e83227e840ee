"""`mixer bench sampler`: how long MixtureSampler takes to draw one step, per global batch and domain count.

For each (global batch, K) a MixtureSampler draws `steps` consecutive steps while its weights change
every `change_every` steps (random Dirichlet weights, a fifth of them with a zero; each version is
due at the step about to be drawn, as live training receives them, so the step that applies it
also pays for rebuilding the interleaver's tree). Each step is timed (wall clock, garbage
collection paused) as the loaders pay it: `next_rank_keys`, the whole global batch drawn and one
data-parallel rank's share turned into (domain, index) keys. `next_global_arrays` (the numpy form
of the whole batch, no Python tuples) is timed on a second sampler fed the same weights. The per-sample smooth weighted round-robin loop the sampler used
before (`OldSwrrLoop`, kept here only as the baseline) draws the first BASELINE_STEPS steps of the
same schedule in the same run; the speedup is its median over the new median.

Target: at most 1 ms per step (median) at global batch 4096, for every K.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from mixer.megatron.sampler import _SCALE, MixtureSampler, quantize_weights

TARGET_MS = 1.0
TARGET_BATCH = 4096
# The old loop takes 5-30 ms a step: enough steps for a stable median, not for the whole run.
BASELINE_STEPS = 20


class OldSwrrLoop:
    """The previous per-sample loop (smooth weighted round-robin, one numpy argmax per draw): baseline only."""

    def __init__(self, num_domains: int, global_batch_size: int, weights: np.ndarray, dp_size: int) -> None:
        self.global_batch_size = global_batch_size
        self.dp_size = dp_size
        self.units = quantize_weights(weights)
        self.credits = np.zeros(num_domains, dtype=np.int64)
        self.drawn = np.zeros(num_domains, dtype=np.int64)

    def set_weights(self, weights: np.ndarray) -> None:
        self.units = quantize_weights(weights)

    def next_global_batch(self) -> list[tuple[int, int]]:
        batch = []
        for _ in range(self.global_batch_size):
            self.credits += self.units
            masked = np.where(self.units > 0, self.credits, np.iinfo(np.int64).min)
            domain = int(np.argmax(masked))
            self.credits[domain] -= _SCALE
            batch.append((domain, int(self.drawn[domain])))
            self.drawn[domain] += 1
        return batch

    def rank_slice(self, batch: list[tuple[int, int]]) -> list[tuple[int, int]]:
        per_rank = len(batch) // self.dp_size
        return batch[:per_rank]


def _weight_schedule(K: int, steps: int, change_every: int, seed: int) -> list[np.ndarray | None]:
    """Per step: the weights that become due at that step, or None (step 0 always has weights);
    a fifth of them with one zero weight."""
    rng = np.random.default_rng(seed)
    out: list[np.ndarray | None] = []
    for step in range(steps):
        if step % change_every:
            out.append(None)
            continue
        w = rng.dirichlet(np.ones(K) * rng.choice([0.3, 1.0, 5.0]))
        if K > 1 and rng.random() < 0.2:
            w[rng.integers(K)] = 0.0
        out.append(w)
    return out


def _time_steps(
    schedule: list[np.ndarray | None], step_fn: Callable[[int, np.ndarray | None], Any]
) -> list[float]:
    """Milliseconds of step_fn(step, due_weights) for every step, garbage collection paused."""
    times = []
    gc.disable()
    try:
        for step, due in enumerate(schedule):
            t0 = time.perf_counter()
            step_fn(step, due)
            times.append((time.perf_counter() - t0) * 1e3)
    finally:
        gc.enable()
    return times


def _stats(times: list[float]) -> tuple[float, float]:
    ordered = sorted(times)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


def bench_one(
    global_batch: int, K: int, *, steps: int, baseline_steps: int, change_every: int, dp_size: int, seed: int
) -> dict[str, Any]:
    """One table row: this rank's keys, the array form and the old loop, same weights schedule."""
    schedule = _weight_schedule(K, steps, change_every, seed)
    first = np.asarray(schedule[0])

    def make() -> MixtureSampler:
        return MixtureSampler(K, global_batch, first, fingerprint="bench", dp_size=dp_size)

    listed, arrays = make(), make()

    def new_list(step: int, due: np.ndarray | None) -> Any:
        if due is not None:
            listed.set_weights(due, version=step + 1, effective_step=step)
        return listed.next_rank_keys(step)

    def new_arrays(step: int, due: np.ndarray | None) -> Any:
        if due is not None:
            arrays.set_weights(due, version=step + 1, effective_step=step)
        return arrays.next_global_arrays(step)

    old = OldSwrrLoop(K, global_batch, first, dp_size)

    def old_list(step: int, due: np.ndarray | None) -> Any:
        if due is not None:
            old.set_weights(due)
        return old.rank_slice(old.next_global_batch())

    make().next_global_batch(0)  # untimed: first allocations
    list_ms, arrays_ms = _time_steps(schedule, new_list), _time_steps(schedule, new_arrays)
    old_ms = _time_steps(schedule[:baseline_steps], old_list)
    median, p90 = _stats(list_ms)
    arrays_median, arrays_p90 = _stats(arrays_ms)
    old_median, old_p90 = _stats(old_ms)
    row: dict[str, Any] = {
        "global_batch": global_batch,
        "K": K,
        "steps": steps,
        "median_ms": round(median, 4),
        "p90_ms": round(p90, 4),
        "arrays_median_ms": round(arrays_median, 4),
        "arrays_p90_ms": round(arrays_p90, 4),
        "old_steps": len(old_ms),
        "old_median_ms": round(old_median, 4),
        "old_p90_ms": round(old_p90, 4),
        "speedup": round(old_median / median, 1) if median > 0 else None,
    }
    if global_batch == TARGET_BATCH:
        row["meets_target"] = median <= TARGET_MS
    return row


def run_sampler_bench(
    *,
    global_batches: tuple[int, ...] = (1024, 4096),
    Ks: tuple[int, ...] = (8, 64),
    steps: int = 200,
    change_every: int = 5,
    dp_size: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """Rows of per-step draw latency for every (global batch, K); see the module docstring."""
    if steps < 1 or change_every < 1 or dp_size < 1:
        raise ValueError(
            f"steps, change_every and dp_size must be >= 1, got {steps}, {change_every}, {dp_size}"
        )
    for b in global_batches:
        if b % dp_size:
            raise ValueError(f"global batch {b} is not divisible by dp_size {dp_size}")
    baseline_steps = min(steps, BASELINE_STEPS)
    rows = [
        bench_one(
            b,
            K,
            steps=steps,
            baseline_steps=baseline_steps,
            change_every=change_every,
            dp_size=dp_size,
            seed=seed,
        )
        for b in global_batches
        for K in Ks
    ]
    return {
        "global_batches": list(global_batches),
        "Ks": list(Ks),
        "steps": steps,
        "change_every": change_every,
        "dp_size": dp_size,
        "target_ms": TARGET_MS,
        "target_batch": TARGET_BATCH,
        "rows": rows,
    }


def format_table(result: dict[str, Any]) -> str:
    """One line per (global batch, K): the new step (this rank's keys) and the array form against the old loop."""
    head = ("batch", "K", "median ms", "p90 ms", "arrays ms", "old ms", "old p90", "old steps", "speedup")
    lines = ["{:>6} {:>4} {:>10} {:>9} {:>10} {:>9} {:>9} {:>9} {:>8}  notes".format(*head)]
    for r in result["rows"]:
        note = "" if "meets_target" not in r else ("ok" if r["meets_target"] else "MISSES TARGET")
        lines.append(
            f"{r['global_batch']:>6} {r['K']:>4} {r['median_ms']:>10.3f} {r['p90_ms']:>9.3f} "
            f"{r['arrays_median_ms']:>10.3f} {r['old_median_ms']:>9.2f} {r['old_p90_ms']:>9.2f} "
            f"{r['old_steps']:>9} {r['speedup']:>7.1f}x  {note}"
        )
    return "\n".join(lines)
