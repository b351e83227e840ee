"""Export a job's versions, weights or signals to Parquet or CSV (pyarrow), and import versions back.

Tables (one file each; the job's spec and identity travel in the Parquet schema metadata, or in
a `PATH.meta.json` sidecar beside a CSV file):

- weights:  one row per version: job, version, effective_step, then `weight/<domain>` per domain.
- versions: the weights table plus trigger_step, log_seq, created_at, params_json and the
            binary params (`blob`; hex text in `blob_hex` in CSV). Exact: `mixer import` rebuilds
            the versions from it bit for bit.
- signals:  one row per report in log order: seq, step, source, source_seq, applied_version,
            num_samples, received_at, `<field>/<domain>` for each per-domain field any report
            carries (null where a report lacks it) and `extra/<key>`. Per-sample arrays are list
            columns (`sample_loss`, `sample_domain`, ...) in Parquet; CSV cannot hold lists, so
            they go to a flat table `<stem>.samples.csv` beside it (one row per sample: seq,
            step, source, index, then the sample fields).

A derived job's signals are its source job's log (the one it was replayed over).
"""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from tqdm import tqdm

from mixer.engine import Engine, Version
from mixer.replay import ReplayError, decode, get_job, log_owner, store_derived
from mixer.signals import PER_DOMAIN_FIELDS, PER_SAMPLE_FIELDS
from mixer.spec import JobSpec, SpecError
from mixer.store import JobRecord, Store

WHATS = ("weights", "versions", "signals")
FORMATS = ("parquet", "csv")
META_PREFIX = "mixer."


class ExportError(ReplayError):
    """An export or import cannot proceed; the message names the file or column."""


def _meta(rec: JobRecord, what: str, **more: Any) -> dict[str, str]:
    spec = JobSpec.from_json(rec.spec_json)
    meta = {"job": rec.name, "what": what, "spec": rec.spec_json, "fingerprint": rec.fingerprint,
            "source_job": rec.source_job or "", "domains": json.dumps(spec.domain_names), **more}
    return {META_PREFIX + k: str(v) for k, v in meta.items()}


def versions_table(store: Store, name: str, what: str = "versions") -> pa.Table:
    """A job's versions as one row per version, a `weight/<domain>` column per domain."""
    rec = get_job(store, name)
    spec = JobSpec.from_json(rec.spec_json)
    rows = store.versions(rec.id)
    w = np.array([v.weights for v, _ in rows], dtype=np.float64).reshape(len(rows), spec.num_domains)
    cols: dict[str, Any] = {
        "job": pa.array([rec.name] * len(rows), pa.string()),
        "version": pa.array([v.version for v, _ in rows], pa.int64()),
        "effective_step": pa.array([v.effective_step for v, _ in rows], pa.int64()),
    }
    if what == "versions":
        cols["trigger_step"] = pa.array([v.trigger_step for v, _ in rows], pa.int64())
        cols["log_seq"] = pa.array([v.log_seq for v, _ in rows], pa.int64())
        cols["created_at"] = pa.array([c for _, c in rows], pa.float64())
    for j, d in enumerate(spec.domain_names):
        cols[f"weight/{d}"] = pa.array(w[:, j], pa.float64())
    if what == "versions":
        cols["params_json"] = pa.array([json.dumps(v.params, sort_keys=True) for v, _ in rows], pa.string())
        cols["blob"] = pa.array([v.blob for v, _ in rows], pa.binary())
    more = {}
    try:  # how far the job trained (what `mixer job create --init-from FILE` averages over)
        more["max_step"] = store.log_stats(log_owner(store, rec).id)[2]
    except ReplayError:
        pass  # an imported trajectory has no log here
    return pa.table(cols).replace_schema_metadata(_meta(rec, what, **more))


def signals_table(store: Store, name: str, *, progress: bool = False) -> pa.Table:
    """A job's log as one row per report, per-sample arrays as list columns."""
    rec = get_job(store, name)
    spec = JobSpec.from_json(rec.spec_json)
    owner = log_owner(store, rec)
    K, total = spec.num_domains, store.log_stats(owner.id)[0]
    base: dict[str, list] = {k: [] for k in ("seq", "step", "source", "source_seq", "applied_version", "num_samples", "received_at")}
    dom = {f: (np.zeros((total, K), np.int64 if f == "domain_sample_count" else np.float64), np.zeros(total, bool)) for f in PER_DOMAIN_FIELDS}
    samples: dict[str, list] = {f: [] for f in PER_SAMPLE_FIELDS}
    extra: dict[str, dict[int, float]] = {}
    i = -1
    # islice: reports appended while reading belong to the next export.
    for i, s in enumerate(tqdm(islice(store.signals(owner.id), total), total=total, desc=f"exporting signals of {owner.name}",
                               unit="report", disable=not progress, leave=False, delay=1.0)):
        r = decode(s.payload, K)
        for k, v in (("seq", s.seq), ("step", r.step), ("source", r.source), ("source_seq", r.seq),
                     ("applied_version", r.applied_version), ("num_samples", r.num_samples), ("received_at", s.received_at)):
            base[k].append(v)
        for f, (arr, present) in dom.items():
            if (v := getattr(r, f)) is not None:
                arr[i], present[i] = v, True
        for f in PER_SAMPLE_FIELDS:
            samples[f].append(getattr(r, f))
        for k, v in r.extra.items():
            extra.setdefault(k, {})[i] = v
    n = i + 1
    cols: dict[str, pa.Array] = {"seq": pa.array(base["seq"], pa.int64()), "step": pa.array(base["step"], pa.int64()),
                                 "source": pa.array(base["source"], pa.string()), "source_seq": pa.array(base["source_seq"], pa.int64()),
                                 "applied_version": pa.array(base["applied_version"], pa.int64()),
                                 "num_samples": pa.array(base["num_samples"], pa.int64()), "received_at": pa.array(base["received_at"], pa.float64())}
    for f, (arr, present) in dom.items():
        if present[:n].any():
            for j, d in enumerate(spec.domain_names):
                cols[f"{f}/{d}"] = pa.array(arr[:n, j], mask=~present[:n])
    for k, vals in sorted(extra.items()):
        cols[f"extra/{k}"] = pa.array([vals.get(i, np.nan) for i in range(n)], pa.float64(), mask=np.array([i not in vals for i in range(n)]))
    for f, dtype in PER_SAMPLE_FIELDS.items():
        parts = samples[f]
        if f == "sample_topic" and any(p is not None and p.ndim == 2 for p in parts):
            # Several topics per sample: a list of each sample's topic ids (the -1 padding dropped).
            rows = [None if p is None else [[int(t) for t in np.atleast_1d(row) if t >= 0] for row in p] for p in parts]
            cols[f] = pa.array(rows, pa.list_(pa.list_(pa.int32())))
            continue
        if any(p is not None for p in parts):
            lengths = np.array([0 if p is None else p.shape[0] for p in parts], np.int64)
            offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32 if lengths.sum() < 2**31 else np.int64))
            values = pa.array(np.concatenate([p for p in parts if p is not None]).astype(dtype))
            mask = pa.array([p is None for p in parts])
            list_cls = pa.ListArray if offsets.type == pa.int32() else pa.LargeListArray
            cols[f] = list_cls.from_arrays(offsets, values, mask=mask)
    return pa.table(cols).replace_schema_metadata(_meta(rec, "signals", log_job=owner.name))


def flat_samples(table: pa.Table) -> pa.Table:
    """The per-sample list columns of a signals table as one row per sample."""
    lists = [f for f in PER_SAMPLE_FIELDS if f in table.column_names]
    if not lists:
        return pa.table({"seq": pa.array([], pa.int64())})
    first = table.column(lists[0]).combine_chunks()
    lengths = first.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    rows = np.repeat(np.arange(table.num_rows), lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)])[:-1]
    cols = {"seq": table.column("seq").take(pa.array(rows)), "step": table.column("step").take(pa.array(rows)),
            "source": table.column("source").take(pa.array(rows)), "index": pa.array(np.arange(rows.size) - np.repeat(starts, lengths))}
    for f in lists:
        col = table.column(f).combine_chunks()
        if not np.array_equal(col.value_lengths().fill_null(0).to_numpy(zero_copy_only=False), lengths):
            raise ExportError(f"signals: {f} has other per-report lengths than {lists[0]}")
        flat = col.flatten()
        if pa.types.is_list(flat.type):  # several topics per sample: "3 7" in one CSV cell
            flat = pa.array([" ".join(map(str, ids)) for ids in flat.to_pylist()], pa.string())
        cols[f] = flat
    return pa.table(cols)


def write(table: pa.Table, path: Path, fmt: str) -> list[Path]:
    """Write a table (and, for CSV, its metadata sidecar and flat samples); the files written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        pq.write_table(table, path)
        return [path]
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    lists = [f for f in PER_SAMPLE_FIELDS if f in table.column_names]
    out = [path, meta_path(path)]
    if lists:
        samples = path.with_name(path.stem + ".samples.csv")
        pacsv.write_csv(flat_samples(table), samples)
        meta[META_PREFIX + "samples_file"] = samples.name
        out.append(samples)
        table = table.drop_columns(lists)
    if "blob" in table.column_names:
        hexed = pa.array([b.hex() for b in table.column("blob").to_pylist()], pa.string())
        table = table.drop_columns(["blob"]).append_column("blob_hex", hexed)
    pacsv.write_csv(table.replace_schema_metadata(None), path)
    meta_path(path).write_text(json.dumps(meta, indent=1))
    return out


def meta_path(path: Path) -> Path:
    return Path(str(path) + ".meta.json")


def export_job(store: Store, name: str, what: str, fmt: str, out: Path, *, progress: bool = False) -> dict[str, Any]:
    """Export one table of a job; a summary of what was written."""
    if what not in WHATS:
        raise ExportError(f"--what {what!r} is not one of {', '.join(WHATS)}")
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    table = signals_table(store, name, progress=progress) if what == "signals" else versions_table(store, name, what)
    files = write(table, out, fmt)
    return {"job": name, "what": what, "format": fmt, "rows": table.num_rows, "columns": table.num_columns, "files": [str(f) for f in files]}


def read(path: Path) -> tuple[pa.Table, dict[str, str]]:
    """An exported table and its metadata (without the `mixer.` prefix), from Parquet or CSV + sidecar."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such file")
    if path.suffix == ".csv":
        side = meta_path(path)
        if not side.is_file():
            raise ExportError(f"{path}: CSV without its metadata sidecar {side.name} (written by `mixer export`)")
        raw = json.loads(side.read_text())
        names = json.loads(raw.get(META_PREFIX + "domains", "[]"))
        types = {"job": pa.string(), "source": pa.string(), "params_json": pa.string(), "blob_hex": pa.string()}
        types.update({f"weight/{d}": pa.float64() for d in names})
        types.update({f"{f}/{d}": pa.int64() if f == "domain_sample_count" else pa.float64() for f in PER_DOMAIN_FIELDS for d in names})
        table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types=types))
        if "blob_hex" in table.column_names:
            blobs = pa.array([bytes.fromhex(h or "") for h in table.column("blob_hex").to_pylist()], pa.binary())
            table = table.drop_columns(["blob_hex"]).append_column("blob", blobs)
    else:
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise ExportError(f"{path}: not a Parquet file written by `mixer export` ({e})") from None
        raw = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    meta = {k[len(META_PREFIX):]: v for k, v in raw.items() if k.startswith(META_PREFIX)}
    if "spec" not in meta:
        raise ExportError(f"{path}: no mixer metadata (mixer.spec); was it written by `mixer export`?")
    return table, meta


def read_versions(path: Path) -> tuple[JobSpec, dict[str, str], list[Version]]:
    """The spec, metadata and versions of an exported `--what versions` file."""
    table, meta = read(path)
    if meta.get("what") != "versions":
        raise ExportError(f"{path}: holds {meta.get('what')!r}; only a `--what versions` export carries every field of a version")
    try:
        spec = JobSpec.from_json(meta["spec"])
    except SpecError as e:
        raise ExportError(f"{path}: embedded spec is invalid: {e}") from None
    need = ["version", "effective_step", "trigger_step", "log_seq", "params_json", "blob", *(f"weight/{d}" for d in spec.domain_names)]
    missing = [c for c in need if c not in table.column_names]
    if missing:
        raise ExportError(f"{path}: missing column {missing[0]!r} (have {', '.join(table.column_names)})")
    col = {c: table.column(c).to_pylist() for c in need}
    w = np.column_stack([np.asarray(col[f"weight/{d}"], np.float64) for d in spec.domain_names])
    versions = [Version(version=col["version"][i], effective_step=col["effective_step"][i], weights=w[i].copy(),
                        params=json.loads(col["params_json"][i]), blob=bytes(col["blob"][i] or b""),
                        trigger_step=col["trigger_step"][i], log_seq=col["log_seq"][i]) for i in range(table.num_rows)]
    if [v.version for v in versions] != list(range(len(versions))):
        raise ExportError(f"{path}: versions must run 0, 1, 2, ... without gaps")
    return spec, meta, versions


def import_versions(store: Store, path: Path, name: str | None = None) -> dict[str, Any]:
    """Store an exported versions trajectory as a job derived from the exported one."""
    spec, meta, versions = read_versions(path)
    name = name or meta["job"]
    try:
        spec = JobSpec.from_dict({**spec.to_dict(), "name": name})
    except SpecError as e:
        raise ExportError(f"--as {name!r}: {e}") from None
    # An imported job has versions but no log: the engine state in its snapshot is the initial
    # one with the newest version as current, so a server serves that version; it takes no reports.
    engine = Engine(spec)
    engine.current, engine.last_log_seq = versions[-1], versions[-1].log_seq
    rec, written = store_derived(store, spec, meta["job"], versions, (versions[-1].version, versions[-1].log_seq, engine.snapshot()))
    return {"job": rec.name, "source_job": rec.source_job, "versions": len(versions), "written": written, "file": str(path)}
