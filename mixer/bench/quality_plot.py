"""`mixer bench quality`'s figures: per-strategy summary, the Markdown table and the PNG.

summarize(runs, strategies, domains) turns the runs (mixer.bench.quality) into per-strategy figures:
final mean and worst-domain balanced validation loss, steps to reach the same seed's uniform final
mean (interpolated between evaluation points, as a fraction of the run), the paired difference
from uniform on the same seeds (mean and standard deviation over seeds), and the step time against
a detached static run of the same size (uniform: its own interleaved detached blocks).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["format_table", "plot_quality", "steps_to_reach", "summarize"]

# mixing-calibration.md, this CPU model: seed-to-seed spread of uniform's final mean loss.
CALIBRATED_SPREAD = 0.009


def steps_to_reach(history: list[list[Any]], target: float) -> float | None:
    """First step where the mean validation loss reaches target, linearly interpolated; None: never."""
    prev_s, prev_m = 0.0, math.inf
    for s, losses in history:
        m = float(np.mean(losses))
        if m <= target:
            if not math.isfinite(prev_m):
                return float(s)
            return prev_s + (prev_m - target) / (prev_m - m) * (s - prev_s) if prev_m != m else float(s)
        prev_s, prev_m = float(s), m
    return None


def _spread(xs: list[float]) -> float | None:
    return float(np.std(xs, ddof=1)) if len(xs) > 1 else None


def _paired(a: dict[int, float], b: dict[int, float]) -> dict[str, Any]:
    diffs = [a[s] - b[s] for s in sorted(a) if s in b]
    return {
        "mean": float(np.mean(diffs)) if diffs else None,
        "std": _spread(diffs),
        "n": len(diffs),
        "per_seed": diffs,
    }


def summarize(
    runs: list[dict[str, Any]], strategies: list[str], domains: list[str] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(per-strategy figures, attach overhead of the uniform runs); see the module docstring."""
    ok = [r for r in runs if r["status"] == "ok"]
    by = {name: {r["seed"]: r for r in ok if r["strategy"] == name} for name in strategies}
    uni = by.get("uniform", {})
    uni_final = {s: r["final_mean"] for s, r in uni.items()}
    uni_worst = {s: r["final_worst"] for s, r in uni.items()}
    spread = _spread(list(uni_final.values()))
    summary: dict[str, Any] = {}
    for name in strategies:
        rs = by[name]
        if not rs:
            reasons = {f"{r['status']}: {r['reason']}" for r in runs if r["strategy"] == name}
            summary[name] = {"status": "; ".join(sorted(reasons)) or "not run", "seeds": []}
            continue
        ratios = {}
        for s, r in rs.items():
            if s in uni_final:
                reached = steps_to_reach(r["val_history"], uni_final[s])
                ratios[s] = None if reached is None else reached / uni[s]["val_history"][-1][0]
        means = {s: r["final_mean"] for s, r in rs.items()}
        worsts = {s: r["final_worst"] for s, r in rs.items()}
        times = {
            s: (
                r["step_time_attached_s"]
                if name == "uniform" and r.get("step_time_attached_s")
                else r["step_time_s"]
            )
            for s, r in rs.items()
        }
        overhead = [times[s] / r["baseline_step_time_s"] - 1 for s, r in rs.items()
                    if r.get("baseline_step_time_s") and times[s]]
        worst_names = [
            (domains[r["worst_domain"]] if domains else str(r["worst_domain"])) for r in rs.values()
        ]
        d_mean = _paired(means, uni_final)
        summary[name] = {
            "status": "ok",
            "seeds": sorted(rs),
            "final_mean": float(np.mean(list(means.values()))),
            "final_mean_spread": _spread(list(means.values())),
            "final_worst": float(np.mean(list(worsts.values()))),
            "final_worst_spread": _spread(list(worsts.values())),
            "worst_domain": max(set(worst_names), key=worst_names.count),
            "steps_to_uniform": {str(s): v for s, v in ratios.items()},
            "paired_diff_mean": d_mean,
            "paired_diff_worst": _paired(worsts, uni_worst),
            "step_time_s": float(np.median(list(times.values()))),
            "overhead_vs_detached": float(np.mean(overhead)) if overhead else None,
            "verdict": _verdict(name, d_mean),
            "versions": int(np.mean([r["versions"] for r in rs.values()])),
            "wall_s": float(sum(r["wall_s"] for r in rs.values())),
        }
        control = [r["control_weight"] for r in rs.values() if r.get("control_weight") is not None]
        if control:  # total weight on the noise control domains, averaged over the run
            summary[name]["control_weight"] = float(np.mean(control))
    attach = {
        "what": "uniform run, alternating detached / attached blocks in one process; "
        "first step of each block excluded",
        "per_seed": {
            str(s): {
                "detached_s": r["step_time_detached_s"],
                "attached_s": r["step_time_attached_s"],
                "overhead": (r["step_time_attached_s"] / r["step_time_detached_s"] - 1)
                if r.get("step_time_detached_s") and r.get("step_time_attached_s")
                else None,
            }
            for s, r in uni.items()
        },
        "uniform_seed_spread": spread,
    }
    return summary, attach


# Two-sided significance level of the paired test.
ALPHA = 0.05


def paired_test(diffs: list[float]) -> dict[str, Any]:
    """Paired t-test of per-seed differences (strategy - uniform on the same seed) against 0.

    Returns the two-sided p-value and `seeds_needed`: the smallest number of seeds at which a
    difference of this mean and per-seed spread would be significant at ALPHA (the observed t
    grows as sqrt(n), the critical value of Student's t with n - 1 degrees of freedom falls),
    None when the mean is 0. Identical non-zero differences on every seed have p = 0.
    """
    from scipy import stats

    n = len(diffs)
    if n < 2:
        return {"p": None, "seeds_needed": None}
    mean, sd = float(np.mean(diffs)), float(np.std(diffs, ddof=1))
    if mean == 0.0:
        return {"p": 1.0, "seeds_needed": None}
    if sd == 0.0:
        return {"p": 0.0, "seeds_needed": 2}
    t = mean / (sd / math.sqrt(n))
    p = float(2 * stats.t.sf(abs(t), df=n - 1))
    needed = next(
        (m for m in range(2, 1001) if abs(mean) / (sd / math.sqrt(m)) > stats.t.ppf(1 - ALPHA / 2, df=m - 1)),
        None,
    )
    return {"p": p, "seeds_needed": needed}


def _verdict(name: str, d: dict[str, Any]) -> str:
    """A paired t-test over seeds: the same seed's uniform run is the comparison, so the seed-to-seed
    spread of the loss itself (large with noise domains) cancels out of the test."""
    if name == "uniform":
        return "baseline"
    if d["mean"] is None:
        return "no uniform run to compare"
    wins = f"better on {sum(x < 0 for x in d['per_seed'])}/{len(d['per_seed'])} seeds"
    if d["n"] < 2:
        return f"1 seed: no verdict ({wins})"
    test = paired_test(d["per_seed"])
    if test["p"] < ALPHA:
        verdict = "better than uniform" if d["mean"] < 0 else "worse than uniform"
        return f"{verdict} (paired t-test p = {test['p']:.2g}; {wins})"
    needed = test["seeds_needed"]
    more = f", ~{needed} seeds would resolve this difference" if needed else ""
    return f"no significant difference (paired t-test p = {test['p']:.2g}{more}; {wins})"


def _pm(x: float | None, sd: float | None, fmt: str = "{:.4f}", signed: bool = False) -> str:
    if x is None:
        return "-"
    s = (("{:+" + fmt[2:]) if signed else fmt).format(x)
    return s + (f" ± {sd:.4f}" if sd is not None else "")


def _ratio(ratios: dict[str, float | None]) -> str:
    if not ratios:
        return "-"
    vals = list(ratios.values())
    shown = ", ".join("never" if v is None else f"{v:.2f}" for v in vals)
    if len(vals) > 1 and all(v is not None for v in vals):
        shown = f"{np.mean(vals):.2f} ({shown})"
    return shown


HEADER = ("| strategy | final mean val loss | worst-domain val loss (domain) "
          "| steps to uniform's final mean (x uniform's steps) | Δ mean vs uniform | Δ worst vs uniform "
          "| step time (ms) | vs detached static | verdict |")


def _row(name: str, s: dict[str, Any], control: bool = False) -> str:
    if s["status"] != "ok":
        return f"| {name} | {s['status']} | | | | | | | |" + (" |" if control else "")
    dm, dw, base = s["paired_diff_mean"], s["paired_diff_worst"], name == "uniform"
    over = "-" if s["overhead_vs_detached"] is None else f"{100 * s['overhead_vs_detached']:+.1f}%"
    cells = [name, _pm(s["final_mean"], s["final_mean_spread"]),
             f"{_pm(s['final_worst'], s['final_worst_spread'])} ({s['worst_domain']})",
             _ratio(s["steps_to_uniform"]),
             "-" if base else _pm(dm["mean"], dm["std"], signed=True),
             "-" if base else _pm(dw["mean"], dw["std"], signed=True),
             f"{1000 * s['step_time_s']:.0f}", over, s["verdict"]]
    if control:
        cells.append("-" if s.get("control_weight") is None else f"{s['control_weight']:.3f}")
    return "| " + " | ".join(cells) + " |"


def format_table(result: dict[str, Any]) -> str:
    """The Markdown report: the table, then what did not run, the attach overhead and the setup."""
    cfg, m, att = result["config"], result["machine"], result["attach_overhead"]
    control = result.get("control_domains") or []
    scored = result.get("scored_domains") or result["domains"]
    intro = (f"Balanced validation loss (nats/byte: each of the {len(scored)} domains' validation "
             f"windows scored on their own, averaged uniformly) after {cfg['steps']} steps, "
             f"{len(result['seeds'])} seed(s); mean ± standard deviation over seeds. Δ: paired difference "
             "from uniform on the same seeds (negative = better).")
    if control:
        intro += (f" Training also drew from {len(control)} unlearnable control domain(s) ({', '.join(control)}: "
                  "random printable ASCII, ln 95 = 4.55 nats/byte at best), left out of the score; the last "
                  "column is their total weight averaged over the run (uniform: "
                  f"{len(control) / len(result['domains']):.3f}).")
    header = HEADER + (" weight on noise |" if control else "")
    lines = [intro, "", header, "|---" * (10 if control else 9) + "|"]
    lines += [_row(name, result["summary"][name], bool(control)) for name in result["strategies"]]
    if result.get("not_run"):
        lines += ["", "Not run:", *(f"- {k}: {v}" for k, v in result["not_run"].items())]
    per = [f"seed {k}: {1000 * v['detached_s']:.0f} ms detached, {1000 * v['attached_s']:.0f} ms attached "
           f"({100 * v['overhead']:+.1f}%)"
           for k, v in att["per_seed"].items() if v.get("overhead") is not None]
    spread = att["uniform_seed_spread"]
    spread_text = (f"{spread:.4f}" if spread is not None else
                   f"unknown with one seed (calibration note: ~{CALIBRATED_SPREAD} on the CPU model; one "
                   "seed proves nothing)")
    gpu = f", {m['gpu']}" if m.get("gpu") else ""
    lines += [
        "",
        (f"Attach overhead ({att['what']}): {'; '.join(per) or 'not measured'}. For the other strategies "
         "'vs detached static' is the median step time of the attached run (its probes included) against a "
         f"{cfg['baseline_steps']}-step detached static run of the same size just before it, in the same "
         "process; on a shared machine the load can change between the two."),
        "",
        (f"Seed spread of uniform's final mean: {spread_text}. Verdict: a paired t-test of the per-seed "
         f"differences against 0 (two-sided, {ALPHA:g}); where it finds no difference it estimates how many seeds "
         "a difference of the observed mean and spread would need. Steps-to-target under one cosine schedule mostly says whether a run ended below "
         "uniform's final loss: the schedule shapes the end of every curve."),
        "",
        (f"Model: {cfg['layers']} layers x {cfg['hidden']} hidden, {cfg['heads']} heads, "
         f"sequence {cfg['seq']}, batch {cfg['batch']}, lr {cfg['lr']:g} (warm-up 10%, cosine to lr/10), "
         f"{cfg['eval_samples']} validation windows per domain; strategy updates every {cfg['update_every']} "
         "steps."),
        (f"Machine: {m['cpus']} CPUs ({m['platform']}), torch {m['torch']} with {m['torch_threads']} threads"
         f"{gpu}; load average at start {m['load_avg_at_start'][0]:.1f}; device {result['device']}; "
         f"total {result.get('wall_s', 0) / 60:.1f} min."),
        f"Command: `{result['command']}`",
    ]
    return "\n".join(lines) + "\n"


def _mean_curve(runs: list[dict[str, Any]], worst: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Mean over seeds of the mean (or worst-domain) validation loss at the shared evaluation steps."""
    curves = [{s: (max(v) if worst else float(np.mean(v))) for s, v in r["val_history"]} for r in runs]
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return np.array(steps), np.array([np.mean([c[s] for c in curves]) for s in steps])


def plot_quality(result: dict[str, Any], path: Path) -> Path:
    """Mean and worst-domain validation loss vs steps per strategy; each strategy's weights (first seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in result["runs"] if r["status"] == "ok"]
    names = [n for n in result["strategies"] if any(r["strategy"] == n for r in ok)]
    domains = result["domains"]
    cols = min(5, max(1, len(names)))
    rows = math.ceil(len(names) / cols) if names else 0
    fig = plt.figure(figsize=(3.2 * max(cols, 3), 4.2 + 2.6 * rows), layout="constrained")
    grid = fig.add_gridspec(1 + rows, cols, height_ratios=[1.6] + [1] * rows)
    top = grid[0, :].subgridspec(1, 2)
    ax_mean, ax_worst = fig.add_subplot(top[0]), fig.add_subplot(top[1])
    colors = plt.get_cmap("tab10")
    for i, name in enumerate(names):
        rs = [r for r in ok if r["strategy"] == name]
        for ax, worst in ((ax_mean, False), (ax_worst, True)):
            x, y = _mean_curve(rs, worst)
            ax.plot(
                x, y, marker=".", ms=3, lw=1.6 if name == "uniform" else 1.1, color=colors(i % 10), label=name
            )
    for ax, what in ((ax_mean, "mean over domains"), (ax_worst, "worst domain")):
        ax.set_xlabel("step")
        ax.set_ylabel(f"validation loss, {what} (nats/byte)")
        ax.grid(alpha=0.3)
    ax_mean.legend(fontsize=7, ncol=2)
    dcolors = plt.get_cmap("tab20" if len(domains) > 10 else "tab10")
    steps = result["config"]["steps"]
    for i, name in enumerate(names):
        ax = fig.add_subplot(grid[1 + i // cols, i % cols])
        run = min((r for r in ok if r["strategy"] == name), key=lambda r: r["seed"])
        traj = sorted(run["trajectory"], key=lambda t: t[0]) or [[0, [1 / len(domains)] * len(domains)]]
        x = [t[0] for t in traj] + [steps]
        w = np.array([t[1] for t in traj] + [traj[-1][1]])
        ax.stackplot(
            x, w.T, step="post", colors=[dcolors(j % 20) for j in range(len(domains))], labels=domains, lw=0
        )
        ax.set_xlim(0, steps)
        ax.set_ylim(0, 1)
        ax.set_title(f"{name} (seed {run['seed']}): domain weights", fontsize=8)
        ax.tick_params(labelsize=7)
        if i == 0:
            ax.legend(fontsize=5, loc="upper right", ncol=2, framealpha=0.7)
    fig.suptitle(f"mixer bench quality: {len(result['seeds'])} seed(s), {steps} steps", fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
