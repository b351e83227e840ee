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
- `resolve_agent(spec)`: the same for the `agent` strategy (Data Mixing Agent,
  mixer/strategies/agent.py): where `strategy.params.path` names the agent's file and
  `strategy.params.sha256` its hash, the file's bytes must hash to it and go, base64, into
  `strategy.params.model`; a file that does not match is refused and nothing is changed.

The receiving job checks the model against its own features (4 + domains + topics): a mismatch is
refused at job creation, naming both counts. Only the model's tensors are taken; the feature
running means and the optimiser state start afresh (`mixer.weighting.dwm.initial_model`). With
`weighting.params.frozen: true` the receiving job applies the model unchanged and never trains it.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from mixer.spec import MAX_SPEC_BYTES, JobSpec, _Loader
from mixer.store import Store
from mixer.store.repository import redact
from mixer.strategies.agent import MAX_MODEL_CHARS, SHA256_RE
from mixer.weighting.params import DWM_MAX_INIT_CHARS

__all__ = [
    "TransferError",
    "export_weighting_model",
    "resolve_agent",
    "resolve_init_from",
    "resolve_spec_text",
    "write_weighting_model",
]

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


def resolve_agent(spec: dict[str, Any], base_dir: str | Path = ".") -> dict[str, Any]:
    """A copy of a spec mapping whose `agent` strategy names its file by `strategy.params.path`
    (relative to `base_dir`) and `sha256`, with the file's bytes, base64, in `strategy.params.model`.
    TransferError when the file is missing, too large or hashes to another value; a spec that
    names no file, or already carries the model, is returned as it is (the strategy checks it)."""
    strategy = spec.get("strategy") if isinstance(spec, dict) else None
    if not isinstance(strategy, dict) or strategy.get("name") != "agent":
        return spec
    params = strategy.get("params")
    if not isinstance(params, dict):
        return spec
    value, sha256 = params.get("path"), params.get("sha256")
    if not isinstance(value, str) or not value or params.get("model") or len(value) > _MAX_PATH:
        return spec
    where = "strategy.params.path"
    if not isinstance(sha256, str) or not SHA256_RE.fullmatch(sha256):
        raise TransferError(
            f"strategy.params.sha256: must be the agent file's sha256 (64 lowercase hex digits), got {sha256!r}"
        )
    path = Path(base_dir) / value
    if not path.is_file():
        raise TransferError(
            f"{where}: {path}: no such file (the agent `mixer agent train` wrote: actor.safetensors)"
        )
    size = path.stat().st_size
    if size * 4 / 3 > MAX_MODEL_CHARS:
        raise TransferError(
            f"{where}: {path} is {size} bytes; a spec carries at most {MAX_MODEL_CHARS * 3 // 4} bytes of agent"
        )
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise TransferError(
            f"{where}: {path} has sha256 {actual}, but strategy.params.sha256 names {sha256}: "
            "not the agent the spec names (retrained, or another file?)"
        )
    out = copy.deepcopy(spec)
    out["strategy"]["params"]["model"] = base64.b64encode(data).decode("ascii")
    return out


def load_spec_data(text: str) -> Any:
    """A spec's text as data, read as JobSpec.from_yaml reads it (JSON, or YAML through the spec's
    bounded loader); None when it is too large or cannot be read, so the spec parser names the problem."""
    if not isinstance(text, str) or len(text.encode("utf-8", "surrogatepass")) > MAX_SPEC_BYTES:
        return None
    try:
        if text.lstrip().startswith("{"):
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                pass
        return yaml.load(text, Loader=_Loader)  # the spec's SafeLoader: no aliases, bounded depth
    except (yaml.YAMLError, RecursionError):
        return None


def resolve_spec_text(text: str, base_dir: str | Path = ".") -> str:
    """A spec file's text with the files it names resolved (`weighting.params.init_from`, see
    resolve_init_from; the agent's `strategy.params.path`, see resolve_agent); the text unchanged
    when it names no file, so its errors stay the spec parser's."""
    if "init_from" not in text and "agent" not in text:
        return text
    data = load_spec_data(text)
    if not isinstance(data, dict):
        return text
    resolved = resolve_agent(resolve_init_from(data, base_dir), base_dir)
    return text if resolved is data else json.dumps(resolved)
