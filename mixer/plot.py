"""Plots of recorded and derived jobs: stacked domain weights over steps, and per-domain training loss.

One column per job, side by side: on top the weights in force at each step (a stackplot of the
versions by effective step), below the token-mean training loss per domain from the log, binned
over steps, and the per-domain validation loss of the log's val_loss reports (dashed, with markers;
the feedback of an `agent` job or of a trajectory `mixer agent collect` recorded). A derived job
shows the losses of the log it was replayed over. Matplotlib, Agg backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mixer.replay import ReplayError, decode, get_job, log_owner
from mixer.spec import JobSpec
from mixer.store import Store


@dataclass(slots=True)
class JobSeries:
    """What one column of the figure shows."""

    name: str
    strategy: str
    source_job: str | None
    domains: list[str]
    steps: np.ndarray
    """Effective step of each version."""
    weights: np.ndarray
    """(versions, K) weights in force from each effective step."""
    loss_steps: np.ndarray
    """Centre of each step bin with any loss."""
    loss: np.ndarray
    """(bins, K) token-mean loss; NaN where a domain had no tokens in a bin."""
    log_job: str | None
    val_steps: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """Step of each validation report."""
    val_loss: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    """(reports, K) validation loss per domain."""


def load_series(store: Store, name: str, *, bins: int = 200, progress: bool = False) -> JobSeries:
    """Versions and binned per-domain loss of a job, from the database."""
    rec = get_job(store, name)
    spec = JobSpec.from_json(rec.spec_json)
    K = spec.num_domains
    rows = store.versions(rec.id)
    steps = np.array([v.effective_step for v, _ in rows], np.int64)
    weights = np.array([v.weights for v, _ in rows], np.float64).reshape(len(rows), K)
    try:
        owner = log_owner(store, rec)
    except ReplayError:
        owner = None  # an imported trajectory: versions only
    s_list, loss_list, tok_list, val_list = [], [], [], []
    if owner is not None:
        total = store.log_stats(owner.id)[0]
        for s in tqdm(islice(store.signals(owner.id), total), total=total, desc=f"reading losses of {owner.name}", unit="report",
                      disable=not progress, leave=False, delay=1.0):
            r = decode(s.payload, K)
            if r.val_loss is not None:
                val_list.append((r.step, r.val_loss))
            if r.domain_token_count is not None and r.domain_loss_sum is not None:
                s_list.append(r.step)
                loss_list.append(r.domain_loss_sum)
                tok_list.append(r.domain_token_count)
    loss_steps, loss = _bin_loss(np.array(s_list, np.int64), np.array(loss_list).reshape(-1, K), np.array(tok_list).reshape(-1, K), bins)
    val_steps = np.array([v[0] for v in val_list], np.int64)
    val_loss = np.array([v[1] for v in val_list], np.float64).reshape(len(val_list), K)
    return JobSeries(rec.name, spec.strategy.name, rec.source_job, spec.domain_names, steps, weights, loss_steps, loss,
                     owner.name if owner else None, val_steps, val_loss)


def _bin_loss(steps: np.ndarray, loss_sum: np.ndarray, tokens: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Token-weighted mean loss per domain over equal step bins (the binning is the smoothing)."""
    K = loss_sum.shape[1]
    if steps.size == 0:
        return np.zeros(0), np.zeros((0, K))
    lo, hi = int(steps.min()), int(steps.max()) + 1
    edges = np.unique(np.linspace(lo, hi, min(bins, hi - lo) + 1).round().astype(np.int64))
    idx = np.searchsorted(edges, steps, side="right") - 1
    n = edges.size - 1
    L, T = np.zeros((n, K)), np.zeros((n, K))
    np.add.at(L, idx, loss_sum)
    np.add.at(T, idx, tokens)
    keep = T.sum(axis=1) > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(T > 0, L / np.where(T > 0, T, 1.0), np.nan)
    centres = (edges[:-1] + edges[1:] - 1) / 2.0
    return centres[keep], mean[keep]


def _colors(names: list[str]) -> dict[str, Any]:
    import matplotlib

    # tab10 keeps neighbours apart; tab20 pairs light and dark shades, so only for more domains.
    maps = ["tab10"] if len(names) <= 10 else ["tab20", "tab20b", "tab20c"]
    palette = [c for m in maps for c in matplotlib.colormaps[m].colors]
    if len(names) > len(palette):
        palette = [matplotlib.colormaps["hsv"](i / len(names)) for i in range(len(names))]
    return {n: palette[i] for i, n in enumerate(names)}


def plot_jobs(store: Store, names: list[str], out: Path, *, bins: int = 200, progress: bool = False, dpi: int = 120) -> dict[str, Any]:
    """Write one PNG comparing the jobs side by side; a summary of what was drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not names:
        raise ReplayError("plot: name at least one job")
    series = [load_series(store, n, bins=bins, progress=progress) for n in names]
    all_domains = list(dict.fromkeys(d for s in series for d in s.domains))
    color = _colors(all_domains)
    fig, axes = plt.subplots(2, len(series), figsize=(5.2 * len(series) + 1.8, 7.2), squeeze=False, sharey="row",
                             gridspec_kw={"height_ratios": [1.1, 1.0]})
    summary = []
    for col, s in enumerate(series):
        top, bottom = axes[0, col], axes[1, col]
        end = max(int(s.steps.max()) if s.steps.size else 0, int(np.ceil(s.loss_steps.max())) if s.loss_steps.size else 0,
                  int(s.val_steps.max()) if s.val_steps.size else 0, 1)
        x = np.append(s.steps, max(end, int(s.steps[-1]) + 1)) if s.steps.size else np.array([0, end])
        y = np.vstack([s.weights, s.weights[-1:]]) if s.steps.size else np.zeros((2, len(s.domains)))
        top.stackplot(x, y.T, colors=[color[d] for d in s.domains], step="post", linewidth=0)
        top.set_xlim(0, x[-1])
        top.set_ylim(0, 1)
        title = f"{s.name}  ({s.strategy}, {len(s.steps)} versions)"
        if s.source_job:
            title += f"\nreplayed over {s.log_job}'s log (open loop)" if s.log_job else f"\nimported from {s.source_job}"
        top.set_title(title, fontsize=10)
        top.set_xlabel("step")
        if s.loss_steps.size:
            for j, d in enumerate(s.domains):
                bottom.plot(s.loss_steps, s.loss[:, j], color=color[d], linewidth=1.3)
        if s.val_steps.size:
            for j, d in enumerate(s.domains):
                bottom.plot(s.val_steps, s.val_loss[:, j], color=color[d], linewidth=1.0, linestyle="--", marker="o", markersize=3)
        if not s.loss_steps.size and not s.val_steps.size:
            bottom.text(0.5, 0.5, "no log in this database", ha="center", va="center", transform=bottom.transAxes, color="0.4")
        bottom.set_xlim(0, x[-1])
        bottom.set_xlabel("step")
        bottom.grid(alpha=0.3)
        summary.append({"job": s.name, "strategy": s.strategy, "versions": len(s.steps), "loss_bins": len(s.loss_steps),
                        "val_reports": len(s.val_steps), "log_job": s.log_job})
    axes[0, 0].set_ylabel("domain weight (stacked)")
    axes[1, 0].set_ylabel("loss: training (token mean), validation (dashed)"
                          if any(s.val_steps.size for s in series) else "training loss (token mean)")
    # Reversed, so the legend reads top to bottom like the stack.
    handles = [plt.Rectangle((0, 0), 1, 1, color=color[d]) for d in reversed(all_domains)]
    fig.legend(handles, list(reversed(all_domains)), loc="center right", fontsize=9, frameon=False, title="domain",
               ncol=1 if len(all_domains) <= 24 else 2)
    fig.tight_layout(rect=(0, 0, 1.0 - 1.6 / fig.get_figwidth() * (1 if len(all_domains) <= 24 else 2), 1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return {"output": str(out), "bytes": out.stat().st_size, "jobs": summary}
