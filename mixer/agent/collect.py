"""Collect data-mixing trajectories for the Data Mixing Agent (Yang et al. 2025, arXiv:2507.15640).

The paper trains a small proxy model (50M parameters) along many randomly drawn data-mixing
trajectories and records the evaluation environment's feedback after every re-weighting step. Here
the proxy is `mixer bench quality --quick`'s byte-level megatron-core GPT on the CPU
(mixer.megatron.pretrain.run_pretrain over the corpus that mixer.bench.quality prepares), attached to
one real `mixer serve`: each trajectory is a mixer job whose `static` strategy in `mode: schedule`
replays the drawn weights (mixer.agent.trajectory.sample_schedule), one re-weighting step every
`segment_steps` steps, with a balanced per-domain validation after each step (the feedback). The
weights recorded as the trajectory's actions are the ones the sampler applied, read back from the
job's versions (mean over each step), not the nominal schedule.

Runs fan out as Ray tasks (local `ray.init(num_cpus=...)` by default, an existing cluster by
`address`), one CPU each. A finished trajectory is a file, <out>/trajectories/<name>.json, written
atomically; a re-run skips those and runs the rest (a run cut short leaves no file). Trajectory i's
weights come from the seed (seed, i), so a re-run draws the same ones. Choices that are ours: the
sampling scheme (see trajectory.py), T = 8 steps of 10 proxy steps by default (the paper: 80
re-weighting steps per trajectory on a 50M model), validation loss as the feedback.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mixer.agent.trajectory import Trajectory, sample_schedule

__all__ = ["CollectConfig", "collect", "load_trajectories"]

MAX_TRAJECTORIES = 100_000
MAX_SEGMENTS = 10_000


def _quick():
    from mixer.bench.quality_config import PRESETS

    return PRESETS["quick"]


@dataclass(kw_only=True)
class CollectConfig:
    """What `collect` runs."""

    trajectories: int = 16
    """How many trajectories (proxy runs) the folder should hold when done."""
    segments: int = 8
    """T: re-weighting steps per trajectory."""
    segment_steps: int = 10
    """Proxy training steps per re-weighting step."""
    alpha0: float = 1.0
    """Dirichlet concentration of the first distribution (1: uniform on the simplex)."""
    kappa: float = 10.0
    """Concentration of the random walk between steps (larger: smaller moves)."""
    seed: int = 0
    proxy: Any = field(default_factory=_quick)
    """The proxy model: a mixer.bench.quality_config.QualityConfig (its `steps` is replaced by segments x segment_steps)."""

    def validate(self) -> CollectConfig:
        def integer(name: str, lo: int, hi: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {v!r}")

        integer("trajectories", 1, MAX_TRAJECTORIES)
        integer("segments", 2, MAX_SEGMENTS)
        integer("segment_steps", 1, 1_000_000)
        integer("seed", 0, 2**63 - 1)
        if not 0 < self.alpha0 <= 1e3:
            raise ValueError(f"alpha0 must lie in (0, 1000], got {self.alpha0}")
        if not 0 < self.kappa <= 1e4:
            raise ValueError(f"kappa must lie in (0, 10000], got {self.kappa}")
        return self

    @property
    def steps(self) -> int:
        return self.segments * self.segment_steps


def _segment_means(applied: list[tuple[int, np.ndarray]], segments: int, seg: int) -> np.ndarray:
    """Mean weights over each step's proxy steps, from (effective step, weights) in step order."""
    out = np.zeros((segments, applied[0][1].size))
    for i, (start, w) in enumerate(applied):
        end = applied[i + 1][0] if i + 1 < len(applied) else segments * seg
        for j in range(segments):
            lo, hi = max(start, j * seg), min(end, (j + 1) * seg)
            if hi > lo:
                out[j] += (hi - lo) * w
    return out / seg


def run_trajectory(task: dict[str, Any]) -> dict[str, Any]:
    """One proxy run (a Ray task, or called directly): train along the schedule, write the file."""
    import torch

    from mixer.client import MixerClient
    from mixer.megatron.pretrain import PretrainConfig, run_pretrain

    torch.set_num_threads(1)  # one Ray CPU each
    cfg, path = task["proxy"], Path(task["path"])
    spec_path = path.with_suffix(".yaml")
    spec_path.write_text(yaml.safe_dump(task["spec"], sort_keys=False))
    steps = task["segments"] * task["segment_steps"]
    t0 = time.perf_counter()
    rec = run_pretrain(
        PretrainConfig.of(
            spec=spec_path,
            mixer=task["address"],
            steps=steps,
            global_batch_size=cfg["batch"],
            seq_length=cfg["seq"],
            layers=cfg["layers"],
            hidden=cfg["hidden"],
            heads=cfg["heads"],
            lr=cfg["lr"],
            min_lr=cfg["lr"] / 10,
            seed=task["spec"]["seed"],
            eval_interval=task["segment_steps"],
            eval_samples=cfg["eval_samples"],
            cache_dir=Path(task["index"]),
            progress=False,
            flush_timeout=120.0,
        )
    )
    job = task["spec"]["name"]
    with MixerClient(task["address"]) as client:
        versions = {v.version: v for v in client.list_versions(job)}
    applied = [(int(st), np.asarray(versions[v].weights)) for v, st in rec["applied"] if v in versions]
    if not applied or applied[0][0] > 0:
        raise RuntimeError(
            f"job {job}: the sampler's applied versions do not cover step 0 ({rec['applied'][:3]})"
        )
    val = [(int(s), np.asarray(v, dtype=np.float64)) for s, v in rec["val_history"]]
    want = [(j + 1) * task["segment_steps"] for j in range(task["segments"])]
    if [s for s, _ in val] != want:
        raise RuntimeError(f"job {job}: evaluations at steps {[s for s, _ in val]}, expected {want}")
    domains = [d["name"] for d in task["spec"]["domains"]]
    traj = Trajectory(
        job,
        tuple(domains),
        task["segment_steps"],
        _segment_means(applied, task["segments"], task["segment_steps"]),
        np.stack([v for _, v in val]),
    )
    doc = traj.to_dict(
        index=task["index_no"],
        seed=task["spec"]["seed"],
        nominal=task["nominal"],
        proxy=cfg,
        wall_s=time.perf_counter() - t0,
        step_time_s=rec["step_time_s"],
    )
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc))
    tmp.replace(path)
    spec_path.unlink()
    return {"path": str(path), "job": job}


def load_trajectories(folder: Path) -> list[Trajectory]:
    """Every finished trajectory under folder (or folder/trajectories), in name order."""
    from mixer.agent.trajectory import TrajectoryError

    folder = Path(folder)
    sub = folder / "trajectories"
    root = sub if sub.is_dir() else folder
    if not root.is_dir():
        raise TrajectoryError(f"{folder}: no such folder (run `mixer agent collect --out {folder}` first)")
    files = sorted(root.glob("*.json"))
    if not files:
        raise TrajectoryError(
            f"{root}: no trajectories (*.json) to train on (run `mixer agent collect` first)"
        )
    out = []
    for f in files:
        try:
            doc = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise TrajectoryError(f"{f}: unreadable ({e})") from None
        out.append(Trajectory.from_dict(doc, str(f)))
    return out


def collect(
    *,
    out: Path,
    config: CollectConfig | None = None,
    corpus: Path | None = None,
    cache: Path | None = None,
    mixer: str | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    progress: bool = True,
    noise_domains: int = 0,
) -> dict[str, Any]:
    """Run the missing trajectories of `config` under out/trajectories; returns a summary.

    mixer: host:port of a running `mixer serve` (None: start one on out/mixer.db); address: a Ray
    cluster (None: a local Ray with num_cpus CPUs); corpus: JSONL domains (None: the packaged minipile);
    noise_domains: add `mixer bench quality --noise-domains N`'s unlearnable domains (the same files
    and names, noise-0 ... last), so that the agent trained here has that benchmark's domain space."""
    from mixer.bench.corpus import default_corpus, prepare_corpora

    cfg = (config or CollectConfig()).validate()
    if isinstance(noise_domains, bool) or not isinstance(noise_domains, int) or not 0 <= noise_domains <= 64:
        raise ValueError(f"noise_domains must be an integer in [0, 64], got {noise_domains!r}")
    out = Path(out).resolve()
    folder = out / "trajectories"
    folder.mkdir(parents=True, exist_ok=True)
    corpus = Path(corpus) if corpus is not None else default_corpus()
    if not corpus.is_dir():
        raise ValueError(f"corpus {corpus}: no such folder")
    cache = Path(cache).resolve() if cache else out / "prepared"
    prepared = prepare_corpora(corpus, out, cache, noise_domains, False, progress)
    root, prefixes = prepared.root, prepared.prefixes
    domains = list(prefixes)
    if len(domains) < 2:
        raise ValueError(f"corpus {corpus}: {len(domains)} domain(s); mixing needs at least 2")
    done = {p.stem for p in folder.glob("*.json")}
    todo = _tasks(cfg, folder, {d: prefixes[d]["train"] for d in domains}, root / "index", done)
    summary: dict[str, Any] = {
        "out": str(out),
        "domains": domains,
        "requested": cfg.trajectories,
        "skipped": len(done & {_name(i) for i in range(cfg.trajectories)}),
        "ran": 0,
        "failed": [],
    }
    if not todo:
        return summary
    server = None
    if mixer is None:
        from mixer.bench.launch import ServerProcess

        server = ServerProcess(str(out / "mixer.db"), out).start()
        mixer = server.address
    for t in todo:
        t["address"] = mixer
    try:
        summary["ran"], summary["failed"] = _fan_out(todo, address, num_cpus, progress)
    finally:
        if server is not None:
            server.terminate()
    return summary


def _name(i: int) -> str:
    return f"traj-{i:05d}"


def _tasks(
    cfg: CollectConfig, folder: Path, prefixes: dict[str, str], index: Path, done: set[str]
) -> list[dict[str, Any]]:
    """One task per trajectory not in `done`: its job spec, its drawn schedule and where it goes."""
    proxy = dataclasses.replace(cfg.proxy, steps=cfg.steps)
    proxy_dict = {
        k: getattr(proxy, k)
        for k in ("layers", "hidden", "heads", "seq", "batch", "steps", "lr", "eval_samples")
    }
    runid = time.strftime("%Y%m%d-%H%M%S")
    todo = []
    for i in range(cfg.trajectories):
        name = _name(i)
        if name in done:
            continue
        rng = np.random.Generator(np.random.PCG64([cfg.seed, i]))
        nominal = sample_schedule(len(prefixes), cfg.segments, rng, alpha0=cfg.alpha0, kappa=cfg.kappa)
        todo.append(
            {
                "path": str(folder / f"{name}.json"),
                "spec": _schedule_spec(f"agent-{runid}-{name}", cfg, i, nominal, prefixes),
                "proxy": proxy_dict,
                "nominal": nominal.tolist(),
                "segments": cfg.segments,
                "segment_steps": cfg.segment_steps,
                "index": str(index),
                "index_no": i,
                "address": None,
            }
        )
    return todo


def _schedule_spec(
    job: str, cfg: CollectConfig, i: int, nominal: np.ndarray, prefixes: dict[str, str]
) -> dict[str, Any]:
    """The job spec of trajectory i: a `static` schedule of its drawn weights, one entry per step."""
    return {
        "name": job,
        "seed": cfg.seed * MAX_TRAJECTORIES + i,
        "unit": "samples",
        "strategy": {
            "name": "static",
            "params": {
                "mode": "schedule",
                "schedule": [
                    {"step": j * cfg.segment_steps, "weights": nominal[j].tolist()}
                    for j in range(cfg.segments)
                ],
            },
        },
        "domains": [{"name": d, "prefix": p} for d, p in prefixes.items()],
        "cadence": {"update_every": 1, "min_weight": 0.0},
    }


def _fan_out(
    todo: list[dict[str, Any]], address: str | None, num_cpus: int | None, progress: bool
) -> tuple[int, list[dict[str, str]]]:
    import ray
    from tqdm import tqdm

    started = not ray.is_initialized()
    if started:
        kwargs: dict[str, Any] = {
            "include_dashboard": False,
            "logging_level": "ERROR",
            "log_to_driver": False,
        }
        if address and address != "local":
            kwargs["runtime_env"] = {"py_modules": [str(Path(__file__).resolve().parents[1])]}
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=num_cpus or max(1, (os.cpu_count() or 2) - 1), **kwargs)
    ran, failed = 0, []
    try:
        task = ray.remote(num_cpus=1, max_retries=0)(run_trajectory)
        pending = {task.remote(t): t for t in todo}
        with tqdm(total=len(todo), desc="agent trajectories", unit="run", disable=not progress) as bar:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                t = pending.pop(ready[0])
                try:
                    ray.get(ready[0])
                    ran += 1
                except Exception as e:  # noqa: BLE001 - one failed run must not lose the others
                    lines = str(e).strip().splitlines()
                    failed.append({"path": t["path"], "error": lines[-1] if lines else type(e).__name__})
                bar.update()
    finally:
        if started:
            ray.shutdown()
    return ran, failed
