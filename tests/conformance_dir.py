"""Where the conformance vectors live: tests/conformance, or $MIXER_CONFORMANCE_DIR."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

BUNDLED = Path(__file__).resolve().parent / "conformance"


def conformance_dir(required: str | None = None) -> Path:
    """$MIXER_CONFORMANCE_DIR when set (another set of vectors in the same schema), else tests/conformance."""
    env = os.environ.get("MIXER_CONFORMANCE_DIR")
    folder = Path(env) if env else BUNDLED
    if not folder.is_dir():
        pytest.fail(f"conformance vectors not found: {folder} is not a folder ($MIXER_CONFORMANCE_DIR={env!r})")
    if required is not None and not (folder / required).is_file():
        pytest.fail(f"conformance file {folder / required} is missing")
    return folder
