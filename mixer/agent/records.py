"""Collected trajectories as a table: `mixer agent export` writes them to Parquet or CSV.

One row per re-weighting step of every trajectory under a collect folder, in file order:
job (the mixer job that ran it, in the collecting service's database, where `mixer export` and
`mixer plot` read its versions and log), trajectory (its index), segment (1..T), step (the proxy
step of the evaluation that closed it), `action/<domain>` (the weights applied during the step,
from the job's versions), `val_loss/<domain>` (the per-domain validation loss after it) and
`nominal/<domain>` (the weights the drawn schedule asked for). The table's metadata carries what
`mixer export` writes for a job (the `mixer.` prefix; `what` = trajectories), plus the domains and
the training-data hash `mixer agent train` records in an agent's card; written by
mixer.export.write, so a CSV file gets the same metadata sidecar.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from mixer.agent.collect import load_trajectories
from mixer.agent.trajectory import TRAJECTORY_FORMAT, data_hash, one_domain_space

__all__ = ["export_trajectories", "trajectories_table"]

FORMATS = ("parquet", "csv")


def trajectories_table(folder: Path) -> pa.Table:
    """Every finished trajectory under folder (or folder/trajectories) as one table (see above)."""
    from mixer.export import META_PREFIX

    trajs = load_trajectories(Path(folder))
    domains = one_domain_space(trajs, "one table holds one domain space")
    docs = _documents(Path(folder))
    rows: dict[str, list[Any]] = {"job": [], "trajectory": [], "segment": [], "step": []}
    actions, losses, nominal = [], [], []
    for t, doc in zip(trajs, docs, strict=True):
        T = t.actions.shape[0]
        rows["job"] += [t.job] * T
        rows["trajectory"] += [int(doc.get("index", -1))] * T
        rows["segment"] += list(range(1, T + 1))
        rows["step"] += [(j + 1) * t.segment_steps for j in range(T)]
        actions.append(t.actions)
        losses.append(t.losses)
        nom = np.asarray(doc.get("nominal", np.full_like(t.actions, np.nan)), dtype=np.float64)
        nominal.append(nom if nom.shape == t.actions.shape else np.full_like(t.actions, np.nan))
    cols: dict[str, pa.Array] = {
        "job": pa.array(rows["job"], pa.string()),
        "trajectory": pa.array(rows["trajectory"], pa.int64()),
        "segment": pa.array(rows["segment"], pa.int64()),
        "step": pa.array(rows["step"], pa.int64()),
    }
    for prefix, parts in (("action", actions), ("val_loss", losses), ("nominal", nominal)):
        block = np.concatenate(parts)
        for k, d in enumerate(domains):
            cols[f"{prefix}/{d}"] = pa.array(block[:, k], pa.float64())
    meta = {
        "what": "trajectories",
        "format": TRAJECTORY_FORMAT,
        "domains": json.dumps(list(domains)),
        "data_hash": data_hash(trajs),
        "trajectories": str(len(trajs)),
    }
    return pa.table(cols).replace_schema_metadata({META_PREFIX + k: v for k, v in meta.items()})


def _documents(folder: Path) -> list[dict[str, Any]]:
    """The raw trajectory files in the order load_trajectories reads them (for their extra fields)."""
    sub = folder / "trajectories"
    root = sub if sub.is_dir() else folder
    return [json.loads(p.read_text()) for p in sorted(root.glob("*.json"))]


def export_trajectories(folder: Path, out: Path, fmt: str | None = None) -> dict[str, Any]:
    """Write the table of folder's trajectories to out (Parquet or CSV: fmt, else out's suffix)."""
    from mixer.export import write

    fmt = fmt or ("csv" if Path(out).suffix == ".csv" else "parquet")
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    table = trajectories_table(folder)
    files = write(table, Path(out), fmt)
    return {
        "what": "trajectories",
        "format": fmt,
        "rows": table.num_rows,
        "trajectories": len(set(table.column("job").to_pylist())),
        "columns": table.num_columns,
        "files": [str(f) for f in files],
    }
