"""`mixer bench quality`: what each mixing strategy does to a small GPT, through the real path.

Per strategy and seed: a byte-level megatron-core GPT (mixer.megatron.pretrain.run_pretrain) on
the corpus prepared as indexed datasets, drawn by the live MixtureSampler, attached to one real
`mixer serve` (SQLite in the out folder) through a ServiceAttachment; the probes its strategy
declares switch on (DoReMi: a frozen reference forward, the same seed's uniform run; DGA: gradient
alignment; DWM: per-sample alignment; Aioli: periodic balanced validation). dwm-transfer is the DWM
paper's transfer: per seed a smaller model's dwm run (TRANSFER_SOURCE) learns the weighting model,
which is exported to OUT/models/ and starts the run's own model, frozen. Validation is balanced:
each domain's validation windows scored on their own, averaged uniformly. Step-time baseline: the
uniform run alternates blocks of detached and attached steps (identical training: a static job never
changes its mixture), the purest measure of being attached; every other strategy is timed against a
short detached static run of the same size, run just before it in the same process.
Writes result.json, quality.png and table.md (mixer.bench.quality_plot).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mixer.bench.corpus import prepare_corpora
from mixer.bench.quality_config import PRESETS, TRANSFER_SOURCE, QualityConfig, checked_strategies, job_spec
from mixer.bench.quality_plot import format_table, plot_quality, summarize
from mixer.config import ConfigError
from mixer.megatron.pretrain import PretrainError

__all__ = ["run_quality"]


@dataclass(frozen=True)
class _Bench:
    """What every run of one benchmark shares."""

    cfg: QualityConfig
    address: str
    device: str
    out: Path
    index: Path  # megatron's sample-index cache (shared: the prepared data does not change)
    progress: bool
    scored: tuple[int, ...]  # domains in the score (all but the noise control domains)
    control: tuple[int, ...]  # the noise control domains: trained on, not scored


def _run_one(b: _Bench, name: str, seed: int, job: str, spec: dict[str, Any], reference: Path | None):
    """One attached pretraining run (mixer.megatron.pretrain); returns what the report needs from it."""
    from mixer.client import MixerClient
    from mixer.megatron.pretrain import PretrainConfig, run_pretrain

    cfg, uniform = b.cfg, name == "uniform"
    spec_path = b.out / "specs" / f"{name}-s{seed}.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    common: dict[str, Any] = {"spec": spec_path, **_model_args(cfg, b, seed)}
    # a detached static run of the same size just before, in this process: the baseline
    detached = None if uniform else _detached_step_time(b, name, seed, job, spec, common)
    opts = PretrainConfig.of(
        **common,
        mixer=b.address,
        steps=cfg.steps,
        eval_interval=_eval_every(cfg, name),
        eval_samples=cfg.eval_samples,
        save=b.out / "checkpoints" / f"uniform-s{seed}" if uniform else None,
        reference=reference,
        compare_attached=cfg.compare_block if uniform else 0,
        progress=b.progress,
        flush_timeout=120.0,
    )
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    rec = run_pretrain(opts)
    if uniform:  # its detached blocks, interleaved with the attached ones (same training: a static job)
        detached = rec["step_time_detached_s"]
    wall = time.perf_counter() - t0
    with MixerClient(b.address) as client:
        versions = {v.version: v for v in client.list_versions(job)}
    return _run_record(b, name, seed, job, rec, versions, wall, load0, detached)


def _eval_every(cfg: QualityConfig, name: str) -> int:
    """Steps between validations of one run."""
    eval_every = max(1, cfg.steps // cfg.eval_points)
    if name == "aioli":  # its probe segments end on fresh validation losses
        eval_every = min(eval_every, 2 * cfg.update_every)
    if name == "agent":  # it re-weights at every validation
        eval_every = min(eval_every, cfg.update_every)
    return eval_every


def _detached_step_time(
    b: _Bench, name: str, seed: int, job: str, spec: dict[str, Any], common: dict[str, Any]
) -> float:
    """Step time of a static job of the same size, run detached (no service) in this process."""
    from mixer.megatron.pretrain import PretrainConfig, run_pretrain

    cfg = b.cfg
    static = {
        **spec,
        "name": f"{job}-detached",
        "strategy": {"name": "static"},
        "weighting": {"name": "none"},
        "cadence": {"update_every": cfg.update_every},
    }
    static_path = b.out / "specs" / f"{name}-s{seed}-detached.yaml"
    static_path.write_text(yaml.safe_dump(static, sort_keys=False))
    base = run_pretrain(
        PretrainConfig.of(
            **{**common, "spec": static_path}, steps=cfg.baseline_steps, eval_samples=1, progress=False
        )
    )
    return base["step_time_s"]


def _run_record(
    b: _Bench,
    name: str,
    seed: int,
    job: str,
    rec: dict[str, Any],
    versions: dict[int, Any],
    wall: float,
    load0: float,
    detached: float | None,
) -> dict[str, Any]:
    """What the report keeps of one finished run."""
    cfg = b.cfg
    val_all = [[int(s), [float(x) for x in losses]] for s, losses in rec["val_history"]]
    val = [[s, [losses[i] for i in b.scored]] for s, losses in val_all]
    final = np.asarray(val[-1][1])
    trajectory = [
        [int(st), np.asarray(versions[v].weights).tolist()] for v, st in rec["applied"] if v in versions
    ]
    keep = (
        "signals",
        "probes",
        "step_time_s",
        "step_time_attached_s",
        "step_time_detached_s",
        "all_reports_acknowledged",
    )
    return {
        "strategy": name,
        "seed": seed,
        "status": "ok",
        "job": job,
        "wall_s": wall,
        "load_avg_1m": [load0, os.getloadavg()[0]],
        "final_val": final.tolist(),
        "final_mean": float(final.mean()),
        "final_worst": float(final.max()),
        "worst_domain": int(final.argmax()),
        "val_history": val,
        # the weights the sampler applied, from the step each took effect
        "trajectory": trajectory,
        "control_val_history": [[s, [losses[i] for i in b.control]] for s, losses in val_all]
        if b.control
        else [],
        "control_weight": _mean_weight(trajectory, b.control, cfg.steps) if b.control else None,
        "versions": len(versions),
        "applied_versions": len(rec["applied"]),
        "checkpoint": rec["checkpoints"][-1] if rec["checkpoints"] else None,
        "baseline_step_time_s": detached,
        **{k: rec[k] for k in keep},
    }


def _mean_weight(trajectory: list[list[Any]], domains: tuple[int, ...], steps: int) -> float:
    """Total weight on `domains`, averaged over the run's steps (each version from its step on)."""
    total = 0.0
    for i, (start, w) in enumerate(trajectory):
        end = trajectory[i + 1][0] if i + 1 < len(trajectory) else steps
        total += max(0, min(end, steps) - max(start, 0)) * sum(w[d] for d in domains)
    return total / steps if steps else 0.0


def run_quality(
    *,
    corpus: Path,
    strategies: list[str],
    seeds: int,
    cfg: QualityConfig,
    device: str = "cpu",
    out: Path,
    cache: Path | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    noise_domains: int = 0,
    progress: bool = True,
    command: str = "",
    agent: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run every strategy x seed; write result.json, quality.png and table.md under out (rewritten
    after every run, so an interrupted benchmark keeps what it finished). agent: the `agent`
    strategy's parameters (mixer.agent.policy.strategy_spec(PATH)["params"])."""
    from tqdm import tqdm

    from mixer.bench.launch import ServerProcess

    strategies, overrides = checked_strategies(strategies, overrides, agent)
    # Absolute: the service runs in another working directory and opens its database from there.
    out = Path(out).resolve()
    cache = Path(cache).resolve() if cache is not None else None
    _fresh_out(out)
    data = prepare_corpora(
        corpus, out, cache or out / "prepared", noise_domains, "toremi" in strategies, progress
    )
    root, prefixes, tokens, control = data.root, data.prefixes, data.tokens, data.control
    domains = list(prefixes)
    scored = [d for d in domains if d not in control]
    runid = time.strftime("%Y%m%d-%H%M%S")
    result: dict[str, Any] = {
        "command": command,
        "corpus": str(corpus),
        "domains": domains,
        "train_tokens": tokens,
        "scored_domains": scored,
        "control_domains": control,
        "strategies": strategies,
        "seeds": list(range(seeds)),
        "device": device,
        "config": {**cfg.__dict__, "compare_block": cfg.compare_block, "baseline_steps": cfg.baseline_steps},
        "overrides": overrides or {},
        "machine": _machine(device),
        "runs": [],
    }
    runs: list[dict[str, Any]] = result["runs"]
    server = ServerProcess(str(out / "mixer.db"), out).start()
    bench = _Bench(
        cfg,
        server.address,
        device,
        out,
        root / "index",
        progress,
        tuple(domains.index(d) for d in scored),
        tuple(domains.index(d) for d in control),
    )
    files = {"json": out / "result.json", "png": out / "quality.png", "table": out / "table.md"}
    result["files"] = {k: str(v) for k, v in files.items()}
    t_start = time.perf_counter()
    try:
        todo = [(seed, name) for seed in range(seeds) for name in strategies]
        bar = tqdm(todo, desc="quality", unit="run", disable=not progress)
        train = {d: prefixes[d]["train"] for d in domains}
        for seed, name in bar:
            bar.set_postfix(strategy=name, seed=seed)
            job = f"quality-{runid}-{name}-s{seed}"
            spec = functools.partial(job_spec, name, job, seed, train, tokens, cfg, overrides or {})
            runs.append(_run_or_record(bench, runs, name, seed, job, spec))
            if runs[-1]["status"] == "not run":
                continue
            _write(result, files, strategies, scored, time.perf_counter() - t_start)
        bar.close()
    finally:
        server.terminate()
    return result


def _fresh_out(out: Path) -> None:
    """The result folder, with empty specs/, checkpoints/, logs/ and models/ and no service database."""
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("specs", "checkpoints", "logs", "models"):
        shutil.rmtree(out / sub, ignore_errors=True)
        (out / sub).mkdir()
    for f in out.glob("mixer.db*"):  # one fresh service database per benchmark
        f.unlink()


def _run_or_record(
    bench: _Bench,
    runs: list[dict[str, Any]],
    name: str,
    seed: int,
    job: str,
    spec: Callable[[], dict[str, Any]],
) -> dict[str, Any]:
    """One strategy x seed: its result, or a record of why it did not run or failed (its traceback
    under logs/), so the benchmark goes on with the other runs."""
    base = {"strategy": name, "seed": seed, "job": job}
    ref = None
    if name.startswith("doremi") or name == "token-reference":  # reference: the same seed's uniform run
        uni = next((r for r in runs if r["strategy"] == "uniform" and r["seed"] == seed), {})
        if not uni.get("checkpoint"):
            return {
                **base,
                "status": "not run",
                "reason": "its reference model is the uniform run of the same seed, which did not finish",
            }
        ref = Path(uni["checkpoint"])
    run_spec = spec()
    try:
        if name == "dwm-transfer" and not run_spec["weighting"]["params"].get("init_from"):
            source = _transfer_source(bench, seed, job, run_spec)
            run_spec["weighting"]["params"]["init_from"] = source["model"]
            return {**_run_one(bench, name, seed, job, run_spec, ref), "transfer_source": source}
        return _run_one(bench, name, seed, job, run_spec, ref)
    except Exception as e:  # noqa: BLE001 - record it and go on with the other runs
        (bench.out / "logs" / f"{name}-s{seed}.txt").write_text(traceback.format_exc())
        plain = isinstance(e, (PretrainError, ConfigError))  # says what to change already
        msg = str(e) if plain else f"{type(e).__name__}: {e}"
        return {**base, "status": "failed", "reason": msg}


def _model_args(size: Any, b: _Bench, seed: int) -> dict[str, Any]:
    """PretrainConfig.of's model, batch and optimiser settings from a size (a preset or the run's
    settings: both name them batch, seq, layers, hidden, heads, lr), on this benchmark's device."""
    return {
        "global_batch_size": size.batch,
        "seq_length": size.seq,
        "layers": size.layers,
        "hidden": size.hidden,
        "heads": size.heads,
        "lr": size.lr,
        "min_lr": size.lr / 10,
        "seed": seed,
        "device": b.device,
        "cache_dir": b.index,
    }


def _transfer_source(b: _Bench, seed: int, job: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Learn the weighting model dwm-transfer starts from: a dwm run with the model and batch of the
    TRANSFER_SOURCE preset, over this run's steps and cadence, attached to the same service, its
    newest model exported to OUT/models/ (mixer.transfer: what `mixer export --what weighting-model`
    writes). What it was is recorded with the run."""
    from mixer.megatron.pretrain import PretrainConfig, run_pretrain
    from mixer.store import Store
    from mixer.transfer import write_weighting_model

    small = replace(PRESETS[TRANSFER_SOURCE], steps=b.cfg.steps, update_every=b.cfg.update_every)
    params = {k: v for k, v in spec["weighting"]["params"].items() if k not in ("init_from", "frozen")}
    source = {
        **spec,
        "name": f"{job}-source",
        "weighting": {"name": "dwm", "params": {**params, "seq_len": small.seq}},
    }
    path = b.out / "specs" / f"dwm-transfer-s{seed}-source.yaml"
    path.write_text(yaml.safe_dump(source, sort_keys=False))
    t0 = time.perf_counter()
    rec = run_pretrain(
        PretrainConfig.of(
            spec=path,
            mixer=b.address,
            steps=small.steps,
            **_model_args(small, b, seed),
            eval_interval=small.steps,
            eval_samples=small.eval_samples,
            progress=b.progress,
            flush_timeout=120.0,
        )
    )
    model = b.out / "models" / f"dwm-transfer-s{seed}.safetensors"
    store = Store(str(b.out / "mixer.db"))
    try:
        size = write_weighting_model(store, source["name"], model)
    finally:
        store.close()
    shape = {k: getattr(small, k) for k in ("layers", "hidden", "heads", "seq", "batch", "steps")}
    final = [rec["val_history"][-1][1][i] for i in b.scored]
    return {
        "job": source["name"],
        "preset": TRANSFER_SOURCE,
        **shape,
        "final_mean": float(np.mean(final)),
        "wall_s": time.perf_counter() - t0,
        "model": str(model),
        "model_bytes": size,
    }


def _write(
    result: dict[str, Any], files: dict[str, Path], strategies: list[str], scored: list[str], wall: float
) -> None:
    """Summarize the runs so far; (re)write result.json, quality.png and table.md."""
    runs = result["runs"]
    result["wall_s"] = wall
    result["summary"], result["attach_overhead"] = summarize(runs, strategies, scored)
    result["not_run"] = {
        f"{r['strategy']} (seed {r['seed']})": f"{r['status']}: {r['reason']}"
        for r in runs
        if r["status"] != "ok"
    }
    plot_quality(result, files["png"])
    files["table"].write_text(format_table(result))
    tmp = files["json"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, default=_jsonable))
    tmp.replace(files["json"])


def _jsonable(o: Any) -> Any:
    return o.tolist() if hasattr(o, "tolist") else str(o)


def _machine(device: str) -> dict[str, Any]:
    import torch

    info = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_avg_at_start": list(os.getloadavg()),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


if __name__ == "__main__":  # `python -m mixer.bench.quality ARGS` is `mixer bench quality ARGS`
    import runpy
    import sys

    sys.argv[1:1] = ["bench", "quality"]
    runpy.run_module("mixer.cli", run_name="__main__", alter_sys=True)
