"""Where the conformance vectors live: tests/conformance, or $MIXER_CONFORMANCE_DIR.

The conformance tests take everything from the files: which scenarios exist (read when pytest
collects, so each scenario is its own test case), K, widths, steps, hyperparameters and tolerances.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

BUNDLED = Path(__file__).resolve().parent / "conformance"
ENV = "MIXER_CONFORMANCE_DIR"

_cache: dict[Path, dict[str, Any]] = {}


def conformance_dir(required: str | None = None) -> Path:
    """$MIXER_CONFORMANCE_DIR when set (another set of vectors in the same schema), else tests/conformance."""
    env = os.environ.get(ENV)
    folder = Path(env) if env else BUNDLED
    if not folder.is_dir():
        pytest.fail(f"conformance vectors not found: {folder} is not a folder (${ENV}={env!r})")
    if required is not None and not (folder / required).is_file():
        pytest.fail(f"conformance file {folder / required} is missing")
    return folder


def load_vectors(name: str) -> dict[str, Any]:
    """The parsed `<name>.json` of the conformance folder (read once per process)."""
    path = conformance_dir(f"{name}.json") / f"{name}.json"
    if path not in _cache:
        _cache[path] = json.loads(path.read_text())
    return _cache[path]


# "Compare perdomain_scores with atol 1e-6." / "For model_grad_after_reweighting use atol 1e-6."
_FIELD_ATOL = re.compile(
    r"\b(?:compare|for)\s+([A-Za-z_]\w*)\s+(?:with|use)\s+atol\s+(\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)",
    re.IGNORECASE,
)


def field_atols(tolerance: dict[str, Any]) -> dict[str, float]:
    """Per-field atol overrides that a file's tolerance note states in words."""
    return {f: float(v) for f, v in _FIELD_ATOL.findall(str(tolerance.get("note", "")))}


def tolerance(data: dict[str, Any], field: str | None = None) -> dict[str, float]:
    """{"rtol", "atol"} from the file's tolerance block; the note's atol for `field` when it names one."""
    tol = data["tolerance"]
    atol = field_atols(tol).get(field, tol["atol"]) if field is not None else tol["atol"]
    return {"rtol": float(tol["rtol"]), "atol": float(atol)}
