"""Sweeps: grid or random search over strategies x hyperparameters, as counterfactual replays on Ray.

Each trial replays one recorded job's log through a derived spec (another strategy, other
parameters or cadence) and scores the versions with an objective named in the sweep file. The
objectives here are open-loop proxies: the log's losses were measured under the recorded
mixture, so a trial's weights never changed the data its losses came from.

- weighted_loss: mean over logged steps of sum_i w_i(s) L_i(s) / sum_i w_i(s) over the domains
  seen at step s, with w(s) the trial's weights in force at s and L(s) the recorded token-mean
  loss. Minimising it moves weight toward domains whose recorded loss is low (easy or already
  learned); it says which mixture the recorded model did best on, not which would train best.
- target_distance: L1 (or L2) distance between the trial's final (or step-averaged) weights and
  a target mixture, e.g. weights a reference DoReMi run found; it ranks how close a cheap
  strategy gets to a known-good mixture.

A closed-loop objective (train a proxy model under each trial's weights and score its validation
loss) would register here with `register_objective`; the quality benchmark's trainer it needs
does not exist yet, so none is registered.

Trials run as Ray tasks (`ray.init(num_cpus=N)` locally, or an existing cluster by address).
Each finished trial is written to `<results>/trials/<hash>.json`, keyed by a hash of the derived
spec's fingerprint, the log's identity and the objective, so re-running skips finished trials.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tqdm import tqdm

from mixer.engine import Version
from mixer.replay import ReplayError, derive_spec, get_job, load_log, log_owner, replay
from mixer.signals import Report
from mixer.spec import JobSpec
from mixer.store import Store

SEARCHES = ("grid", "random")
DISTRIBUTIONS = ("uniform", "log_uniform", "int")


class SweepError(ReplayError):
    """A sweep file or run is invalid; the message names the field."""


# -- objectives ------------------------------------------------------------------------------


@dataclass(slots=True)
class LogLoss:
    """Per-step token-mean loss of a log: what the open-loop objectives score weights against."""

    steps: np.ndarray
    loss: np.ndarray
    """(steps, K); NaN where a domain had no tokens at that step."""

    @classmethod
    def from_log(cls, log: list[tuple[int, Report]], K: int) -> LogLoss:
        rows = [(r.step, r.domain_loss_sum, r.domain_token_count) for _, r in log if r.domain_loss_sum is not None]
        if not rows:
            return cls(np.zeros(0, np.int64), np.zeros((0, K)))
        steps = np.array([s for s, _, _ in rows], np.int64)
        uniq, idx = np.unique(steps, return_inverse=True)
        L, T = np.zeros((uniq.size, K)), np.zeros((uniq.size, K))
        np.add.at(L, idx, np.array([x for _, x, _ in rows]))
        np.add.at(T, idx, np.array([t for _, _, t in rows]))
        with np.errstate(invalid="ignore", divide="ignore"):
            return cls(uniq, np.where(T > 0, L / np.where(T > 0, T, 1.0), np.nan))


Objective = Callable[[list[Version], LogLoss, dict[str, Any], JobSpec], float]
OBJECTIVES: dict[str, Objective] = {}


def register_objective(name: str) -> Callable[[Objective], Objective]:
    """Make an objective selectable as `objective.kind` in sweep files."""

    def deco(fn: Objective) -> Objective:
        OBJECTIVES[name] = fn
        return fn

    return deco


def weights_at(versions: list[Version], steps: np.ndarray) -> np.ndarray:
    """(len(steps), K): the weights in force at each step (newest version with effective_step <= step)."""
    eff = np.array([v.effective_step for v in versions], np.int64)
    idx = np.clip(np.searchsorted(eff, steps, side="right") - 1, 0, None)
    return np.array([v.weights for v in versions])[idx]


@register_objective("weighted_loss")
def weighted_loss(versions: list[Version], log: LogLoss, cfg: dict[str, Any], spec: JobSpec) -> float:
    keep = log.steps >= int(cfg.get("from_step", 0))
    steps, loss = log.steps[keep], log.loss[keep]
    if steps.size == 0:
        raise SweepError("objective weighted_loss: the log has no domain losses at or after from_step")
    w = weights_at(versions, steps)
    seen = ~np.isnan(loss)
    mass = np.where(seen, w, 0.0).sum(axis=1)
    per_step = np.where(seen, w * np.nan_to_num(loss), 0.0).sum(axis=1) / np.where(mass > 0, mass, 1.0)
    return float(per_step[mass > 0].mean())


@register_objective("target_distance")
def target_distance(versions: list[Version], log: LogLoss, cfg: dict[str, Any], spec: JobSpec) -> float:
    target = _target(cfg.get("target"), spec.domain_names)
    if cfg.get("at", "final") == "mean":
        eff = np.array([v.effective_step for v in versions] + [max(int(log.steps.max()) + 1 if log.steps.size else 0, versions[-1].effective_step + 1)])
        span = np.diff(eff).astype(np.float64)
        w = (np.array([v.weights for v in versions]) * span[:, None]).sum(axis=0) / max(span.sum(), 1.0)
    else:
        w = versions[-1].weights
    d = w - target
    return float(np.sqrt((d * d).sum()) if cfg.get("metric", "l1") == "l2" else np.abs(d).sum())


def _target(raw: Any, domains: list[str]) -> np.ndarray:
    if isinstance(raw, dict):
        unknown = sorted(set(raw) - set(domains))
        if unknown:
            raise SweepError(f"objective.target: unknown domain {unknown[0]!r}; domains: {', '.join(domains)}")
        raw = [raw.get(d, 0.0) for d in domains]
    arr = np.asarray(raw, np.float64) if isinstance(raw, list) else None
    if arr is None or arr.shape != (len(domains),) or (arr < 0).any() or arr.sum() <= 0:
        raise SweepError(f"objective.target: must be {len(domains)} non-negative weights (a list or a mapping domain: weight)")
    return arr / arr.sum()


# -- the sweep file ----------------------------------------------------------------------------


@dataclass(kw_only=True, slots=True)
class SweepConfig:
    """A sweep: which job's log, which trials, how they are scored, where results go."""

    job: str
    """The recorded job whose log every trial replays."""
    objective: dict[str, Any]
    """{kind: weighted_loss | target_distance, direction: min | max, ...}."""
    space: list[dict[str, Any]]
    """Entries {strategy, params: {...}, cadence: {...}, set: {dotted.key: ...}}; lists are choices."""
    search: str = "grid"
    samples: int = 8
    """random: trials drawn per space entry."""
    seed: int = 0
    name: str = ""
    """Name of the best spec written (default `<job>-best`)."""
    results: Path = Path("results")
    best: Path = Path("best.yaml")

    @classmethod
    def load(cls, path: Path) -> SweepConfig:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise SweepError(f"{path}: cannot read the sweep file ({e})") from None
        if not isinstance(data, dict):
            raise SweepError(f"{path}: must be a mapping with job, objective and space")
        allowed = set(cls.__dataclass_fields__)
        if unknown := sorted(set(data) - allowed):
            raise SweepError(f"{path}: {unknown[0]}: unknown field; allowed: {', '.join(sorted(allowed))}")
        for req in ("job", "objective", "space"):
            if req not in data:
                raise SweepError(f"{path}: {req}: required")
        results = path.parent / data.get("results", f"{path.stem}.results")
        cfg = cls(job=str(data["job"]), objective=data["objective"], space=data["space"], search=data.get("search", "grid"),
                  samples=data.get("samples", 8), seed=data.get("seed", 0), name=str(data.get("name", "")),
                  results=results, best=path.parent / data["best"] if "best" in data else results / "best.yaml")
        return cfg.validate(path)

    def validate(self, where: Path | str = "sweep") -> SweepConfig:
        if self.search not in SEARCHES:
            raise SweepError(f"{where}: search: {self.search!r} is not one of {', '.join(SEARCHES)}")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples <= 0:
            raise SweepError(f"{where}: samples: must be a positive integer, got {self.samples!r}")
        obj = self.objective
        if not isinstance(obj, dict) or obj.get("kind") not in OBJECTIVES:
            kind = obj.get("kind") if isinstance(obj, dict) else obj
            raise SweepError(f"{where}: objective.kind: {kind!r} is not one of {', '.join(sorted(OBJECTIVES))} "
                             "(a proxy-training objective needs the quality benchmark's trainer, which does not exist yet)")
        if obj.setdefault("direction", "min") not in ("min", "max"):
            raise SweepError(f"{where}: objective.direction: must be min or max, got {obj['direction']!r}")
        if not isinstance(self.space, list) or not self.space:
            raise SweepError(f"{where}: space: must be a non-empty list of {{strategy, params, cadence, set}}")
        for i, entry in enumerate(self.space):
            if not isinstance(entry, dict) or not isinstance(entry.get("strategy"), str):
                raise SweepError(f"{where}: space[{i}]: must be a mapping with a strategy name")
            if unknown := sorted(set(entry) - {"strategy", "params", "cadence", "set"}):
                raise SweepError(f"{where}: space[{i}].{unknown[0]}: unknown field; allowed: cadence, params, set, strategy")
            for part in ("params", "cadence", "set"):
                if not isinstance(entry.get(part, {}), dict):
                    raise SweepError(f"{where}: space[{i}].{part}: must be a mapping")
        return self


@dataclass(slots=True)
class Trial:
    """One point of the search: a strategy and its `--set` overrides."""

    strategy: str
    sets: dict[str, Any]
    entry: int
    spec: JobSpec | None = None
    key: str = ""

    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.sets.items()) or "(defaults)"


def _axes(entry: dict[str, Any], where: str) -> dict[str, tuple[str, Any]]:
    """`--set` key -> (where it is in the sweep file, values)."""
    axes = {str(k): (f"{where}.params.{k}", v) for k, v in entry.get("params", {}).items()}
    axes.update({f"cadence.{k}": (f"{where}.cadence.{k}", v) for k, v in entry.get("cadence", {}).items()})
    axes.update({str(k): (f"{where}.set.{k}", v) for k, v in entry.get("set", {}).items()})
    return axes


def _draw(v: Any, rng: np.random.Generator, where: str) -> Any:
    if isinstance(v, list):
        return v[int(rng.integers(len(v)))] if v else _fail(f"{where}: an empty list of choices")
    if isinstance(v, dict):
        if len(v) != 1 or next(iter(v)) not in DISTRIBUTIONS:
            raise SweepError(f"{where}: a distribution is one of {{uniform: [a, b]}}, {{log_uniform: [a, b]}}, {{int: [a, b]}}")
        kind, bounds = next(iter(v.items()))
        if not isinstance(bounds, list) or len(bounds) != 2 or not all(isinstance(b, (int, float)) for b in bounds) or bounds[0] > bounds[1]:
            raise SweepError(f"{where}.{kind}: needs [low, high] with low <= high, got {bounds!r}")
        lo, hi = bounds
        if kind == "int":
            return int(rng.integers(int(lo), int(hi) + 1))
        if kind == "log_uniform":
            if lo <= 0:
                raise SweepError(f"{where}.log_uniform: bounds must be > 0, got {bounds!r}")
            return float(f"{np.exp(rng.uniform(np.log(lo), np.log(hi))):.6g}")
        return float(f"{rng.uniform(lo, hi):.6g}")
    return v


def _fail(msg: str) -> Any:
    raise SweepError(msg)


def trials(cfg: SweepConfig) -> list[Trial]:
    """Every trial of the sweep, in a fixed order (random draws are seeded by cfg.seed)."""
    out: list[Trial] = []
    rng = np.random.default_rng(cfg.seed)
    for i, entry in enumerate(cfg.space):
        axes = _axes(entry, f"space[{i}]")
        if cfg.search == "grid":
            for where, v in axes.values():
                if isinstance(v, dict):
                    raise SweepError(f"{where}: distributions need search: random; a grid takes a list of values")
                if v == []:
                    raise SweepError(f"{where}: an empty list of choices")
            keys = list(axes)
            values = [v if isinstance(v, list) else [v] for _, v in axes.values()]
            for combo in itertools.product(*values):
                out.append(Trial(entry["strategy"], dict(zip(keys, combo)), i))
        else:
            for _ in range(cfg.samples):
                out.append(Trial(entry["strategy"], {k: _draw(v, rng, where) for k, (where, v) in axes.items()}, i))
    return out


# -- running -----------------------------------------------------------------------------------


def run_trial(spec_json: str, log: list[tuple[int, Report]], loss: LogLoss, objective: dict[str, Any]) -> dict[str, Any]:
    """Replay one derived spec and score it (runs inside a Ray task)."""
    spec = JobSpec.from_json(spec_json)
    r = replay(spec, log)
    score = OBJECTIVES[objective["kind"]](r.versions, loss, objective, spec)
    final = r.versions[-1].weights
    return {"score": score, "versions": len(r.versions), "seconds": r.seconds,
            "final_weights": dict(zip(spec.domain_names, final.tolist()))}


def _key(spec: JobSpec, log_id: dict[str, Any], objective: dict[str, Any]) -> str:
    doc = json.dumps({"spec": spec.fingerprint(), "log": log_id, "objective": objective}, sort_keys=True, default=str)
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    tmp.replace(path)


def run_sweep(store: Store, cfg: SweepConfig, *, address: str | None = None, num_cpus: int | None = None,
              progress: bool = False) -> dict[str, Any]:
    """Run the sweep's unfinished trials on Ray; rank every trial; write the best spec as YAML."""
    rec = get_job(store, cfg.job)
    base = JobSpec.from_json(rec.spec_json)
    owner = log_owner(store, rec)
    n_reports, last_seq, _ = store.log_stats(owner.id)
    log_id = {"job": owner.name, "fingerprint": owner.fingerprint, "reports": n_reports, "last_seq": last_seq}
    plan = trials(cfg)
    for t in plan:
        try:
            t.spec = derive_spec(base, name=f"{cfg.job}-trial", strategy=t.strategy, sets=t.sets.items())
        except ReplayError as e:
            raise SweepError(f"space[{t.entry}] ({t.strategy}, {t.label()}): {e}") from None
        t.key = _key(t.spec, log_id, cfg.objective)
    unique = list({t.key: t for t in plan}.values())
    folder = cfg.results / "trials"
    folder.mkdir(parents=True, exist_ok=True)
    done = {t.key: json.loads((folder / f"{t.key}.json").read_text()) for t in unique if (folder / f"{t.key}.json").is_file()}
    todo = [t for t in unique if t.key not in done]
    failed: list[dict[str, Any]] = []
    if todo:
        failed = _run_on_ray(store, cfg, todo, log_id, folder, done, address=address, num_cpus=num_cpus, progress=progress)
    rows = sorted((done[t.key] for t in unique if t.key in done), key=lambda r: r["score"], reverse=cfg.objective["direction"] == "max")
    for rank, r in enumerate(rows, 1):
        r["rank"] = rank
    out: dict[str, Any] = {"job": cfg.job, "log_job": owner.name, "objective": cfg.objective, "search": cfg.search,
                           "trials": rows, "ran": len(todo) - len(failed), "skipped": len(unique) - len(todo), "failed": failed,
                           "results": str(cfg.results), "open_loop": True}
    if rows:
        best = next(t for t in unique if t.key == rows[0]["key"])
        spec = JobSpec.from_dict({**best.spec.to_dict(), "name": cfg.name or f"{cfg.job}-best"})
        cfg.best.parent.mkdir(parents=True, exist_ok=True)
        head = (f"# best of {len(rows)} trials over the log of {owner.name!r}: {cfg.objective['kind']} "
                f"({cfg.objective['direction']}) = {rows[0]['score']:.6g}\n# open-loop proxy: that log was recorded under job {owner.name}'s own mixture\n")
        cfg.best.write_text(head + spec.to_yaml())
        out["best_spec"] = str(cfg.best)
    return out


def _run_on_ray(store: Store, cfg: SweepConfig, todo: list[Trial], log_id: dict[str, Any], folder: Path, done: dict[str, Any], *,
                address: str | None, num_cpus: int | None, progress: bool) -> list[dict[str, Any]]:
    import ray

    _, spec, log = load_log(store, cfg.job, progress=progress)
    loss = LogLoss.from_log(log, spec.num_domains)
    started = not ray.is_initialized()
    if started:
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "ERROR", "log_to_driver": False}
        if address and address != "local":
            # Ship this checkout of mixer so a cluster runs the same strategy code as the driver.
            kwargs["runtime_env"] = {"py_modules": [str(Path(__file__).parent)]}
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=num_cpus, **kwargs)
    failed: list[dict[str, Any]] = []
    try:
        task = ray.remote(num_cpus=1)(run_trial)
        log_ref, loss_ref = ray.put(log), ray.put(loss)
        pending = {task.remote(t.spec.to_json(), log_ref, loss_ref, cfg.objective): t for t in todo}
        t0 = time.time()
        with tqdm(total=len(todo), desc="sweep trials", unit="trial", disable=not progress) as bar:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                t = pending.pop(ready[0])
                try:
                    res = ray.get(ready[0])
                except Exception as e:  # noqa: BLE001 - one failed trial must not lose the others
                    failed.append({"key": t.key, "strategy": t.strategy, "sets": t.sets, "error": str(e).strip().splitlines()[-1]})
                else:
                    row = {"key": t.key, "strategy": t.strategy, "sets": t.sets, "spec": t.spec.to_dict(), "log": log_id,
                           "finished_at": time.time(), "wall_s": time.time() - t0, **res}
                    _write_json(folder / f"{t.key}.json", row)
                    done[t.key] = row
                bar.update()
    finally:
        if started:
            ray.shutdown()
    return failed


def ranked_table(result: dict[str, Any], top: int = 20) -> str:
    """The ranked trials as text."""
    obj = result["objective"]
    lines = [f"{'rank':>4} {obj['kind'] + ' (' + obj['direction'] + ')':>24} {'strategy':<10} {'versions':>8}  overrides"]
    for r in result["trials"][:top]:
        sets = " ".join(f"{k}={v}" for k, v in r["sets"].items()) or "(defaults)"
        lines.append(f"{r['rank']:>4} {r['score']:>24.6g} {r['strategy']:<10} {r['versions']:>8}  {sets}")
    if len(result["trials"]) > top:
        lines.append(f"... {len(result['trials']) - top} more in {result['results']}")
    return "\n".join(lines)
