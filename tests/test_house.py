"""House rules a reader relies on: no function in mixer/ is longer than a screen and a half."""

from __future__ import annotations

import ast
from pathlib import Path

import mixer

MAX_FUNCTION_LINES = 80
ROOT = Path(mixer.__file__).resolve().parent


def test_no_function_is_longer_than_the_limit() -> None:
    long = []
    files = [p for p in ROOT.rglob("*.py") if "v1" not in p.relative_to(ROOT).parts]
    assert files, ROOT
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "split these: " + "; ".join(long)
