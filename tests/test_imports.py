"""The import graph of mixer/: no cycles between files, and the pure core never reaches the I/O edge.

The graph is read from the source with `ast` (imports anywhere in a file, lazy ones included;
those under `if TYPE_CHECKING:` are for annotations only and do not count). A package's
`__init__` importing its own children is the package's face, not a dependency of the children
on it, so a child -> parent edge is dropped.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CORE = (
    "mixer.spec",
    "mixer.spec_defaults",
    "mixer.errors",
    "mixer.signals",
    "mixer.shaping",
    "mixer.engine",
    "mixer.strategies",
    "mixer.weighting",
)
"""The pure core (signals in, weights out): no I/O."""
EDGE = ("mixer.server", "mixer.store", "mixer.client", "mixer.reporter", "mixer.cli", "grpc", "sqlalchemy")
"""The I/O edge the core must not import, directly or through another module."""


def _modules(root: Path, package: str) -> dict[str, Path]:
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        name = ".".join(path.relative_to(root).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(path: Path, me: str, is_package: bool) -> set[str]:
    """Absolute names this file imports (`from a import b` gives both a.b and a)."""
    tree = ast.parse(path.read_text(), str(path))
    typing_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = me.split(".") if is_package else me.split(".")[:-1]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*parts, *([base] if base else [])])
            names.add(base)
            names |= {f"{base}.{a.name}" for a in node.names}
    return names


def import_graph(root: Path, package: str) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> modules of the package it imports, module -> every name it imports)."""
    mods = _modules(root, package)

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph, raw = {}, {}
    for me, path in mods.items():
        names = _imports(path, me, path.name == "__init__.py")
        raw[me] = names
        deps = {resolve(n) for n in names} - {None, me}
        graph[me] = {d for d in deps if not me.startswith(d + ".")}
    return graph, raw


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_no_import_cycles_between_files_of_mixer() -> None:
    graph, _ = import_graph(ROOT, "mixer")
    assert len(graph) > 50  # the whole package was read
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def edge_paths(
    graph: dict[str, set[str]], raw: dict[str, set[str]], core: tuple[str, ...], edge: tuple[str, ...]
) -> list[str]:
    """Every import chain from a core module to a name of the edge (direct or through other modules)."""
    bad = set()
    for start in (m for m in graph if _under(m, core)):
        via, todo = {start: [start]}, [start]
        while todo:
            m = todo.pop()
            bad |= {" -> ".join([*via[m], name]) for name in raw[m] if _under(name, edge)}
            for d in sorted(graph[m] - via.keys()):
                via[d] = [*via[m], d]
                todo.append(d)
    return sorted(bad)


def test_the_pure_core_never_reaches_the_io_edge() -> None:
    graph, raw = import_graph(ROOT, "mixer")
    present = {c for c in CORE if any(_under(m, (c,)) for m in graph)}
    assert present == set(CORE)  # every core module is where the rule says
    bad = edge_paths(graph, raw, CORE, EDGE)
    assert not bad, "the core imports the I/O edge:\n" + "\n".join(bad)


def test_the_edge_check_follows_imports_through_other_modules(tmp_path: Path) -> None:
    files = {
        "p/__init__.py": "",
        "p/core.py": "from p import util\n",
        "p/util.py": "def f():\n    import grpc\n",
    }
    _write_package(tmp_path, files)
    graph, raw = import_graph(tmp_path, "p")
    assert edge_paths(graph, raw, ("p.core",), ("grpc",)) == ["p.core -> p.util -> grpc"]
    assert edge_paths(graph, raw, ("p.core",), ("sqlalchemy",)) == []


def _write_package(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        # a lazy import inside a function still closes a cycle
        (
            {"p/__init__.py": "", "p/a.py": "import p.b\n", "p/b.py": "def f():\n    from p import a\n"},
            [["p.a", "p.b"]],
        ),
        # relative imports resolve; three files in one ring
        (
            {
                "p/__init__.py": "",
                "p/a.py": "from .b import x\n",
                "p/b.py": "from . import c\n",
                "p/c.py": "from p.a import y\n",
            },
            [["p.a", "p.b", "p.c"]],
        ),
        # an annotation-only import does not count
        (
            {
                "p/__init__.py": "",
                "p/a.py": "import p.b\n",
                "p/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from p.a import A\n",
            },
            [],
        ),
        # a package's __init__ re-exporting its children is not a cycle with them
        ({"p/__init__.py": "from p.a import f\n", "p/a.py": "from p import g\n"}, []),
    ],
)
def test_the_cycle_check_sees_what_python_would_import(
    tmp_path: Path, files: dict[str, str], expected
) -> None:
    _write_package(tmp_path, files)
    graph, _ = import_graph(tmp_path, "p")
    assert cycles(graph) == expected
