"""Proxy-to-main hand-off: start a job from the mixture a smaller proxy run found.

DoReMi's recipe (Xie et al. 2023, Section 2: "the final domain weights are the average of the
proxy's weights over training", alpha_bar = 1/T sum_t alpha_t) and the way ADO and Aioli users
carry a proxy's result to a larger model: train a proxy, then train the main model on the
proxy's time-averaged mixture. Here the proxy is any mixer job, on this server or recorded in a
`mixer export --what versions` (or `weights`) file, and the average is over the weights it
actually served:

    w_bar = sum_v w_v * |[e_v, e_{v+1}) ∩ [start, end)| / |[start, end)|

where version v was in force from its effective step e_v until the next version's, and
[start, end) is the averaging window over the proxy's trained steps 0 .. max_step:
`all` (start 0), `last:N` (the last N steps) or `from-step:S` (start S). A version computed but
not yet in force by the proxy's last step takes no part. Averaging by steps in force (not by
version count) is our choice: it is what the proxy trained on, whatever the update cadence.

The main job's spec gets these weights as its prior (`domains[i].weight`; a `static` job also
switches to `mode: fixed`, so it serves them unchanged) and records the lineage (`lineage:
{source_job, source, average, final_version, max_step}`), which `mixer job show`, `/api/jobs/NAME`
and the page show. The domain sets must match by name (order may differ); an error names the
missing and the extra domains.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "Averaging",
    "HandoffError",
    "ProxyRun",
    "apply_to_spec",
    "proxy_from_file",
    "proxy_from_server",
    "time_average",
]


class HandoffError(ValueError):
    """The hand-off cannot proceed; the message names the proxy, the rule or the domains."""


@dataclass(frozen=True, slots=True)
class Averaging:
    """Which of the proxy's trained steps the average covers."""

    kind: str = "all"
    """all | last | from-step"""
    value: int = 0

    @classmethod
    def parse(cls, text: str) -> Averaging:
        text = text.strip()
        if text == "all":
            return cls()
        m = re.fullmatch(r"(last|from-step):(\d{1,15})", text)
        if m is None:
            raise HandoffError(f"--average {text!r}: give all, last:N (N >= 1) or from-step:S (S >= 0)")
        kind, value = m.group(1), int(m.group(2))
        if kind == "last" and value < 1:
            raise HandoffError(f"--average {text!r}: last:N needs N >= 1")
        return cls(kind, value)

    def __str__(self) -> str:
        return "all" if self.kind == "all" else f"{self.kind}:{self.value}"

    def window(self, end: int) -> tuple[int, int]:
        """[start, end) over a proxy that trained steps 0 .. end - 1."""
        if self.kind == "last":
            return max(0, end - self.value), end
        if self.kind == "from-step":
            return self.value, end
        return 0, end


def time_average(
    effective_steps: np.ndarray, weights: np.ndarray, end: int, averaging: Averaging
) -> np.ndarray:
    """The step-weighted average of the served weights over the window (see the module docstring).

    effective_steps: (V,) non-decreasing, the first at most the window's start (version 0 is in
    force from step 0); weights: (V, K); end: one past the proxy's newest trained step.
    """
    eff = np.asarray(effective_steps, dtype=np.int64)
    w = np.asarray(weights, dtype=np.float64)
    if eff.ndim != 1 or w.ndim != 2 or w.shape[0] != eff.shape[0]:
        raise HandoffError(f"versions: {eff.shape[0]} effective steps for {w.shape[0]} weight rows")
    if eff.shape[0] == 0:
        raise HandoffError("the proxy has no versions")
    if np.any(np.diff(eff) < 0):
        raise HandoffError("versions: effective steps must not decrease")
    start, stop = averaging.window(end)
    if stop <= start:
        raise HandoffError(
            f"--average {averaging}: the window [{start}, {stop}) holds no trained step "
            f"(the proxy trained steps 0 .. {end - 1})"
        )
    lo = np.maximum(eff, start)
    hi = np.minimum(np.append(eff[1:], np.iinfo(np.int64).max), stop)
    steps = np.clip(hi - lo, 0, None).astype(np.float64)
    if steps.sum() == 0:
        raise HandoffError(f"--average {averaging}: no version was in force in [{start}, {stop})")
    avg = steps @ w / steps.sum()
    return avg / avg.sum()


@dataclass(frozen=True, slots=True)
class ProxyRun:
    """What the hand-off needs of a proxy: its domains, versions and how far it trained."""

    name: str
    source: str
    """"server" or the file it was read from."""
    domains: list[str]
    versions: list[int]
    effective_steps: np.ndarray
    weights: np.ndarray
    max_step: int
    """The proxy's newest trained step (-1: none)."""

    def average(self, averaging: Averaging) -> np.ndarray:
        if self.max_step < 0:
            raise HandoffError(
                f"proxy job {self.name!r} has no reports yet: it trained no step to average over"
            )
        return time_average(self.effective_steps, self.weights, self.max_step + 1, averaging)


def proxy_from_server(client: Any, name: str) -> ProxyRun:
    """The proxy job `name` through a MixerClient (ListVersions, GetJob)."""
    import grpc

    try:
        job = client.get_job(name)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.NOT_FOUND:
            names = ", ".join(j.name for j in client.list_jobs()[:20]) or "none"
            raise HandoffError(f"--init-from: unknown proxy job {name!r} (jobs there: {names})") from None
        raise
    versions = client.list_versions(name)
    if not versions:
        raise HandoffError(f"proxy job {name!r} has no versions")
    return ProxyRun(
        name=name,
        source="server",
        domains=list(job.domains),
        versions=[v.version for v in versions],
        effective_steps=np.array([v.effective_step for v in versions], dtype=np.int64),
        weights=np.array([v.weights for v in versions], dtype=np.float64).reshape(
            len(versions), len(job.domains)
        ),
        max_step=int(job.max_step),
    )


def proxy_from_file(path: Path) -> ProxyRun:
    """A proxy recorded by `mixer export --what versions|weights` (Parquet, or CSV with its sidecar)."""
    from mixer import export

    try:
        table, meta = export.read(path)
    except export.ExportError as e:
        raise HandoffError(f"--init-from {e}") from None
    if meta.get("what") not in ("versions", "weights"):
        raise HandoffError(
            f"{path}: holds {meta.get('what')!r}; export the proxy with --what versions (or weights)"
        )
    if "max_step" not in meta:
        raise HandoffError(
            f"{path}: no mixer.max_step in its metadata; export the proxy again with this version of mixer"
        )
    import json

    domains = json.loads(meta["domains"])
    cols = table.column_names
    missing = [d for d in domains if f"weight/{d}" not in cols]
    if missing or "effective_step" not in cols or "version" not in cols:
        raise HandoffError(
            f"{path}: missing columns {', '.join(f'weight/{d}' for d in missing) or 'version/effective_step'}"
        )
    if table.num_rows == 0:
        raise HandoffError(f"{path}: the proxy has no versions")
    order = np.argsort(np.asarray(table.column("version").to_pylist(), dtype=np.int64), kind="stable")
    w = np.stack(
        [np.asarray(table.column(f"weight/{d}").to_pylist(), dtype=np.float64) for d in domains], axis=1
    )
    return ProxyRun(
        name=meta["job"],
        source=str(path),
        domains=domains,
        versions=[int(x) for x in np.asarray(table.column("version").to_pylist())[order]],
        effective_steps=np.asarray(table.column("effective_step").to_pylist(), dtype=np.int64)[order],
        weights=w[order],
        max_step=int(meta["max_step"]),
    )


def apply_to_spec(spec: dict[str, Any], proxy: ProxyRun, averaging: Averaging) -> dict[str, Any]:
    """The main job's spec (a parsed YAML mapping, not yet validated) initialised from the proxy.

    Returns a new mapping: each domain's prior weight is the proxy's average for the domain of the
    same name, `static` switches to `mode: fixed`, and `lineage` records where the prior came from.
    """
    from mixer.spec import JobSpec

    main = JobSpec.from_dict(spec)  # the user's spec must be valid on its own first
    names = main.domain_names
    missing = sorted(set(names) - set(proxy.domains))
    extra = sorted(set(proxy.domains) - set(names))
    if missing or extra:
        raise HandoffError(
            f"domains differ between the main spec and proxy {proxy.name!r}: "
            f"missing from the proxy: {', '.join(missing) or 'none'}; only in the proxy: {', '.join(extra) or 'none'}"
        )
    avg = proxy.average(averaging)
    by_name = dict(zip(proxy.domains, avg.tolist()))
    out = main.to_dict()
    for d in out["domains"]:
        d["weight"] = by_name[d["name"]]
    if out["strategy"]["name"] == "static":
        out["strategy"]["params"] = {**out["strategy"]["params"], "mode": "fixed"}
    out["lineage"] = {
        "source_job": proxy.name,
        "source": proxy.source,
        "average": str(averaging),
        "final_version": int(proxy.versions[-1]),
        "max_step": int(proxy.max_step),
    }
    return out
