"""Shared helpers for the strategy tests: the conformance vectors and tolerant comparison."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from mixer.spec import JobSpec
from tests.conformance_dir import load_vectors


@pytest.fixture(scope="session")
def conformance():
    """load('odm') -> the parsed odm.json of the conformance folder (tests/conformance_dir.py)."""
    return load_vectors


def _assert_close(got: Any, expected: Any, *, rtol: float, atol: float, what: str) -> None:
    """|got - expected| <= atol + rtol |expected|, elementwise, with a message naming the field."""
    g = np.asarray(got, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert g.shape == e.shape, f"{what}: shape {g.shape} != expected {e.shape}"
    bad = np.abs(g - e) > atol + rtol * np.abs(e)
    if bad.any():
        i = np.unravel_index(int(np.flatnonzero(bad)[0]), g.shape) if g.ndim else ()
        raise AssertionError(f"{what}: at {i} got {g[i]!r}, expected {e[i]!r} (rtol {rtol}, atol {atol})")


def _make_spec(strategy: str, params: dict[str, Any] | None = None, *, K: int = 5, **extra: Any) -> JobSpec:
    data = {
        "name": "t",
        "domains": [{"name": f"d{i}"} for i in range(K)],
        "strategy": {"name": strategy, "params": params or {}},
    }
    data.update(extra)
    return JobSpec.from_dict(data)


@pytest.fixture(scope="session")
def assert_close():
    return _assert_close


@pytest.fixture(scope="session")
def make_spec():
    return _make_spec
