"""`mixer demo`: what dynamic mixing is for, on one machine in about two minutes.

A deterministic synthetic corpus has four domains: two worth learning (`arith`, `prose`), one of
random characters with nothing to learn (`noise`), and one of a few documents repeated many times
that a model learns by heart early (`dupes`). Two jobs train the same tiny Megatron-core GPT on
it, one after the other, through `mixer pretrain`'s path (`run_pretrain`), attached to one
embedded mixer service (SQLite in the work folder):

- `<job>-uniform`: a static uniform mixture, the baseline;
- `<job>-<strategy>`: DoReMi by default (Xie et al. 2023), sampling from its current weights:
  a domain gains weight while the model still lags the uniform run there (its excess loss,
  clipped at 0). The noise domain, where no model does better than chance, drops to the floor
  at once and the tokens go to the domains still being learnt. Late in a long run, once the
  model beats the reference on those, DoReMi's minimax objective turns weight back to noise: the
  only domain left where it still trails the reference (it has seen less noise than the uniform
  run). The table shows both phases; the `mean` row is the mixture the run trained on.

Both runs have the same seed, model and steps; only the mixture differs. The service's page
(its address is printed first) shows both jobs live. At the end: the strategy's weight
versions as a table, and each domain's final validation loss under both mixtures.

Choices that are ours: the corpus (mixer.megatron.corpus), the model size and learning rate
(small enough for two CPU cores), and per-strategy settings for a run of a few hundred steps
(`DEMO_PARAMS`: ADO's warm-up and refit interval are 1,000 steps in its paper's configs, longer
than the whole demo; DoReMi samples from its weights, where the paper reweights the loss and
keeps sampling fixed, so that the table shows the mixture move). A strategy that needs an excess
loss gets the uniform run's final checkpoint as its reference model, as in DoReMi (a reference
trained on the uniform mixture).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

DEFAULT_STRATEGY = "doremi"
DEFAULT_STEPS = 600
UPDATE_EVERY = 10
MIN_WEIGHT = 0.02
EVALUATIONS = 5
"""Balanced validations along each run (the last at its final step)."""

DEMO_PARAMS: dict[str, dict[str, Any]] = {
    # ADO's fit needs a few points of each domain's loss curve: fit after 50 steps, refit every 50.
    "ado": {"warmup_steps": 50, "refit_every": 50, "point_every": 5, "savgol_window": 21},
    # Sampling from the current weights (the paper keeps sampling fixed and reweights the loss).
    "doremi": {"mode": "online"},
}
"""Settings for a run of a few hundred steps; strategies not listed run with their defaults."""


def _spec(
    name: str, strategy: str, params: dict[str, Any], prefixes: dict[str, dict[str, str]]
) -> dict[str, Any]:
    return {
        "name": name,
        "domains": [{"name": d, "prefix": str(Path(p["train"]).resolve())} for d, p in prefixes.items()],
        "strategy": {"name": strategy, **({"params": params} if params else {})},
        "cadence": {"update_every": UPDATE_EVERY, "min_weight": MIN_WEIGHT},
        "unit": "samples",
        "seed": 0,
    }


def _final_val(record: dict[str, Any], K: int) -> list[float]:
    history = record["val_history"]
    return [float(x) for x in history[-1][1]] if history else [float("nan")] * K


def run_demo(
    *,
    address: str | None = None,
    job: str = "demo",
    steps: int = DEFAULT_STEPS,
    strategy: str = DEFAULT_STRATEGY,
    workdir: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the uniform baseline and `strategy` on the demo corpus; returns what was measured."""
    from mixer.bench.launch import ServerProcess
    from mixer.client import MixerClient
    from mixer.megatron.corpus import write_synthetic_corpus
    from mixer.megatron.data import prepare_corpus
    from mixer.signals import EXCESS_LOSS
    from mixer.strategies import strategy_class

    if steps < 1:
        raise ValueError(f"steps: must be at least 1, got {steps}")
    needs_reference = EXCESS_LOSS in strategy_class(strategy).signals
    say = print if progress else (lambda *a, **k: None)
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="mixer-demo-")
        workdir = Path(tmp.name)
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    server = None
    page = None
    try:
        domains = write_synthetic_corpus(workdir / "corpus", seed=0)
        say(f"corpus: {', '.join(domains)} in {workdir / 'corpus'}")
        prefixes = prepare_corpus(workdir / "corpus", workdir / "data", progress=progress)
        if address is None:
            server = ServerProcess(str(workdir / "mixer.db"), workdir).start()
            address = server.address
            page = f"http://127.0.0.1:{server.http_port}/"
            say(f"embedded mixer service on {address} (SQLite {workdir / 'mixer.db'})")
            # Also with progress off (--json): stderr, so stdout stays one JSON document.
            print(f"watch both jobs live: {page}", file=sys.stdout if progress else sys.stderr, flush=True)
        runs = [("uniform", "static", {}), (strategy, strategy, DEMO_PARAMS.get(strategy, {}))]
        t0 = time.perf_counter()
        records = _train(
            runs,
            job=job,
            steps=steps,
            address=address,
            workdir=workdir,
            prefixes=prefixes,
            needs_reference=needs_reference,
            progress=progress,
            say=say,
        )
        elapsed = time.perf_counter() - t0
        with MixerClient(address) as client:
            infos = {label: client.get_job(f"{job}-{label}") for label, _, _ in runs}
            versions = client.list_versions(f"{job}-{strategy}")
        result = _result(
            runs, records, infos, versions, domains=domains, job=job, steps=steps, strategy=strategy
        )
        result.update(seconds=elapsed, address=address, page=page)
        return result
    finally:
        if server is not None:
            server.terminate()
        if tmp is not None:
            tmp.cleanup()


def _train(
    runs: list[tuple[str, str, dict[str, Any]]],
    *,
    job: str,
    steps: int,
    address: str,
    workdir: Path,
    prefixes: Any,
    needs_reference: bool,
    progress: bool,
    say: Any,
) -> dict[str, dict[str, Any]]:
    """Train each run in turn (a spec file each); the strategy's run takes the uniform run's last
    checkpoint as its reference when the strategy needs one. What each run recorded, by label."""
    from mixer.megatron.pretrain import PretrainConfig, run_pretrain

    common = {
        "mixer": address,
        "steps": steps,
        "lr": 2e-3,
        "eval_interval": max(1, steps // EVALUATIONS),
        "cache_dir": workdir / "index",
        "progress": progress,
    }
    records: dict[str, dict[str, Any]] = {}
    for label, name, params in runs:
        spec_path = workdir / f"{job}-{label}.yaml"
        spec_path.write_text(yaml.safe_dump(_spec(f"{job}-{label}", name, params, prefixes), sort_keys=False))
        extra: dict[str, Any] = {}
        if label == "uniform" and needs_reference:
            extra["save"] = workdir / "checkpoints" / "uniform"
        if label != "uniform" and needs_reference:
            extra["reference"] = Path(records["uniform"]["checkpoints"][-1])
        say(f"\njob {job}-{label}: {steps} steps, strategy {name}")
        records[label] = run_pretrain(PretrainConfig.of(spec=spec_path, **common, **extra))
    return records


def _result(
    runs: list[tuple[str, str, dict[str, Any]]],
    records: dict[str, dict[str, Any]],
    infos: dict[str, Any],
    versions: list[Any],
    *,
    domains: list[str],
    job: str,
    steps: int,
    strategy: str,
) -> dict[str, Any]:
    rows = [
        {"version": v.version, "effective_step": v.effective_step, "weights": v.weights.tolist()}
        for v in versions
    ]
    final = {label: _final_val(records[label], len(domains)) for label, _, _ in runs}
    # The mixture each run trained on: each version's weights over the steps it was in force.
    mean_weights = _mean_weights(rows, steps)
    return {
        "domains": domains,
        "steps": steps,
        "strategy": strategy,
        "params": DEMO_PARAMS.get(strategy, {}),
        "update_every": UPDATE_EVERY,
        "jobs": {
            label: {
                "job": f"{job}-{label}",
                "reports_logged": infos[label].report_count,
                "all_acknowledged": records[label]["all_reports_acknowledged"],
                "step_ms": 1000 * records[label]["step_time_s"] if records[label]["step_time_s"] else None,
                "final_val_loss": final[label],
                "evaluations": len(records[label]["val_history"]),
            }
            for label, _, _ in runs
        },
        "versions": rows,
        "mean_weights": mean_weights,
    }


def _mean_weights(rows: list[dict[str, Any]], steps: int) -> list[float]:
    """Each domain's weight averaged over steps 0..steps-1 (a version holds from its effective step)."""
    starts = [min(max(r["effective_step"], 0), steps) for r in rows] + [steps]
    total = np.zeros(len(rows[0]["weights"]))
    for r, a, b in zip(rows, starts, starts[1:]):
        total += max(b - a, 0) * np.asarray(r["weights"])
    return (total / max(steps, 1)).tolist()
