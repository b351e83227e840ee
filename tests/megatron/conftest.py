"""Shared fixtures: one synthetic corpus prepared per test session, in a fresh temp folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mixer.megatron.corpus import write_synthetic_corpus
from mixer.megatron.data import prepare_corpus


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """{domain: {"train": prefix, "val": prefix}} for a small synthetic corpus."""
    root = tmp_path_factory.mktemp("corpus")
    write_synthetic_corpus(root / "jsonl", seed=0, docs_per_domain=120)
    return prepare_corpus(root / "jsonl", root / "indexed", progress=False)


@pytest.fixture()
def domain_prefixes(prepared: dict[str, dict[str, str]]) -> tuple[list[str], list[str], list[str]]:
    """(domain names, train prefixes, val prefixes) in corpus order."""
    names = list(prepared)
    return names, [prepared[d]["train"] for d in names], [prepared[d]["val"] for d in names]


@pytest.fixture()
def cache_dir(tmp_path: Path) -> Path:
    """A fresh GPTDataset index cache (megatron keys it by path, not contents)."""
    return tmp_path / "cache"


@pytest.fixture()
def write_spec(tmp_path: Path, prepared: dict[str, dict[str, str]]):
    """write_spec(name, strategy=..., **spec fields) -> path of a job spec over the session corpus."""

    def make(name: str, strategy: str | dict = "static", **fields) -> Path:
        spec = {
            "name": name,
            "domains": [{"name": d, "prefix": p["train"]} for d, p in prepared.items()],
            "strategy": strategy if isinstance(strategy, dict) else {"name": strategy},
            "cadence": {"update_every": 5, "min_weight": 0.02},
            **fields,
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        return path

    return make
