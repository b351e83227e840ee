"""Run per-shard tasks as Ray tasks (a local Ray, or a cluster by address) or in this process.

As `mixer sweep` does: `ray.init(num_cpus=N)` locally, `ray.init(address=...)` for a cluster
(shipping this checkout of mixer with the job so workers run the same code); a Ray started here
is shut down here. Results come back in the order of the calls, whatever order tasks finish in,
or are folded as they arrive; at most twice the cluster's CPUs of tasks are in flight at once.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

from tqdm import tqdm

from mixer.select.shards import SelectError

__all__ = ["Runner"]


class Runner:
    """`with Runner(address, num_cpus) as r: r.map(fn, calls, sizes, desc, progress)`."""

    def __init__(self, address: str | None, num_cpus: int | None = None):
        self.address = address
        self.num_cpus = num_cpus
        self._started = False

    def __enter__(self) -> Self:
        if self.address is None:
            return self
        import ray

        if not ray.is_initialized():
            kwargs: dict[str, Any] = {
                "include_dashboard": False,
                "logging_level": "ERROR",
                "log_to_driver": False,
            }
            if self.address == "local":
                ray.init(num_cpus=self.num_cpus, **kwargs)
            else:
                kwargs["runtime_env"] = {"py_modules": [str(Path(__file__).parents[1])]}
                ray.init(address=self.address, **kwargs)
            self._started = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._started:
            import ray

            ray.shutdown()
            self._started = False

    def map(
        self,
        fn: Callable[..., Any],
        calls: list[tuple],
        sizes: list[int],
        desc: str,
        progress: bool,
        fold: Callable[[int, Any], None] | None = None,
    ) -> list[Any]:
        """fn(*call) for every call; the bar advances by each call's size (bytes) as it finishes.

        Without `fold`: the results, in the order of the calls. With it: fold(call number, result)
        as each call finishes (in any order), and nothing is kept (an empty list is returned), so
        per-shard arrays are summed as they arrive rather than held for every shard.
        """
        results: list[Any] = [] if fold is not None else [None] * len(calls)

        def done(i: int, result: Any) -> None:
            if fold is None:
                results[i] = result
            else:
                fold(i, result)

        with tqdm(
            total=sum(sizes), unit="B", unit_scale=True, desc=desc, disable=not progress, delay=1.0
        ) as bar:
            if self.address is None:
                for i, call in enumerate(calls):
                    done(i, fn(*call))
                    bar.update(sizes[i])
                return results
            self._on_ray(fn, calls, sizes, bar, done)
        return results

    def _on_ray(
        self, fn: Callable[..., Any], calls: list[tuple], sizes: list[int], bar: tqdm, done: Callable
    ) -> None:
        """Submit the calls as Ray tasks, at most `window` in flight (a driver holds the arguments
        of the tasks it submitted, so a corpus of many shards is not queued all at once)."""
        import ray
        from ray.exceptions import RayTaskError

        task = ray.remote(num_cpus=1)(fn)
        window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        pending: dict[Any, int] = {}
        todo = iter(enumerate(calls))
        try:
            while True:
                for i, call in itertools.islice(todo, max(0, window - len(pending))):
                    pending[task.remote(*call)] = i
                if not pending:
                    return
                ready, _ = ray.wait(list(pending), num_returns=1)
                i = pending.pop(ready[0])
                try:
                    result = ray.get(ready[0])
                except RayTaskError as e:
                    # The task's own error (a bad line, a missing file) says what was wrong.
                    cause = getattr(e, "cause", None)
                    if isinstance(cause, (SelectError, OSError)):
                        raise SelectError(str(cause)) from None
                    raise
                done(i, result)
                bar.update(sizes[i])
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
