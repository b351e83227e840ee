"""Weighting-model transfer (DWM, Yu et al., ICML 2025, arXiv:2507.16178): a weighting model learned
in one job, with one LLM, starts another job, with an LLM of another size or another data
selection, as the paper transfers its learned weighting model.

Two ends, both outside the pure core:

- `export_weighting_model(store, job)`: the model of a job's newest version that carries one (the
  safetensors blob the service published; `mixer.weighting.dwm.from_bytes` reads it), and
  `write_weighting_model` to put it in a file.
- `resolve_init_from(spec)`: where a spec's `weighting.params.init_from` names a file, the client
  reads it when it loads the spec and puts the base64 of its bytes in its place, so the spec the
  service and the workers see carries the model itself (the pure core reads no files).

The receiving job checks the model against its own features (4 + domains + topics): a mismatch is
refused at job creation, naming both counts. Only the model's tensors are taken; the feature
running means and the optimiser state start afresh (`mixer.weighting.dwm.initial_model`). With
`weighting.params.frozen: true` the receiving job applies the model unchanged and never trains it.
"""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

from mixer.spec import JobSpec
from mixer.store import Store
from mixer.store.repository import redact
from mixer.weighting.params import DWM_MAX_INIT_CHARS

__all__ = ["TransferError", "export_weighting_model", "resolve_init_from", "write_weighting_model"]

# Longer than any path a file system takes: such a value can only be the base64 text itself.
_MAX_PATH = 4096


class TransferError(ValueError):
    """The model cannot be exported or read; the message names the job or the file."""


def export_weighting_model(store: Store, job: str) -> bytes:
    """The weighting model of `job`'s newest version that carries one (safetensors bytes)."""
    rec = store.get_job(job)
    if rec is None:
        raise TransferError(f"job {job!r} not found in {redact(store.url)}")
    spec = JobSpec.from_json(rec.spec_json)
    if spec.weighting.name != "dwm":
        raise TransferError(f"job {job!r} has instance weighting {spec.weighting.name!r}, not 'dwm'")
    for version, _ in reversed(store.versions(rec.id)):
        if version.blob:
            from mixer.weighting import dwm

            dwm.from_bytes(version.blob)  # refuses what a receiving job could not load
            return bytes(version.blob)
    raise TransferError(
        f"job {job!r} has published no weighting model yet: its first stage has not finished learning"
    )


def write_weighting_model(store: Store, job: str, path: str | Path) -> int:
    """Export `job`'s model to `path` (a .safetensors file); returns the bytes written."""
    blob = export_weighting_model(store, job)
    Path(path).write_bytes(blob)
    return len(blob)


def resolve_init_from(spec: dict[str, Any], base_dir: str | Path = ".") -> dict[str, Any]:
    """A copy of a spec mapping whose `weighting.params.init_from`, when it names a file (relative
    to `base_dir`), holds the base64 of that file instead; any other value is left for validation."""
    weighting = spec.get("weighting") if isinstance(spec, dict) else None
    params = weighting.get("params") if isinstance(weighting, dict) else None
    value = params.get("init_from") if isinstance(params, dict) else None
    if not isinstance(value, str) or not value or len(value) > _MAX_PATH:
        return spec
    path = Path(base_dir) / value
    try:
        is_file = path.is_file()
    except OSError:  # a base64 text that is no valid file name
        is_file = False
    if not is_file:
        return spec
    size = path.stat().st_size
    if size * 4 / 3 > DWM_MAX_INIT_CHARS:
        raise TransferError(
            f"weighting.params.init_from: {path} is {size} bytes; a spec carries at most "
            f"{DWM_MAX_INIT_CHARS * 3 // 4} bytes of model"
        )
    out = copy.deepcopy(spec)
    out["weighting"]["params"]["init_from"] = base64.b64encode(path.read_bytes()).decode("ascii")
    return out


def resolve_spec_text(text: str, base_dir: str | Path = ".") -> str:
    """A spec file's text with `weighting.params.init_from` resolved (see resolve_init_from); the
    text unchanged when it names no file, so its errors stay the spec parser's."""
    import json

    import yaml

    try:
        data = yaml.safe_load(text) if "init_from" in text else None
    except yaml.YAMLError:
        return text  # the spec parser names the problem
    if not isinstance(data, dict):
        return text
    resolved = resolve_init_from(data, base_dir)
    return text if resolved is data else json.dumps(resolved)
