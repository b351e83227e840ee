"""The minipile corpus ships inside the package and is `mixer bench quality`'s default."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import mixer.bench
from mixer.bench.quality import default_corpus


def test_default_corpus_is_the_bundled_minipile_and_matches_its_manifest() -> None:
    root = default_corpus()
    assert root == Path(mixer.bench.__file__).resolve().parent / "minipile"
    manifest = json.loads((root / "manifest.json").read_text())
    assert (root / "README.md").is_file()
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(manifest["domains"])
    assert len(manifest["domains"]) == manifest["totals"]["domains"] == 8
    for domain, info in manifest["domains"].items():
        for split in ("train", "val"):
            meta = info["splits"][split]
            data = (root / meta["path"]).read_bytes()
            assert len(data) == meta["file_bytes"], meta["path"]
            assert hashlib.sha256(data).hexdigest() == meta["sha256"], meta["path"]
            first = json.loads(gzip.decompress(data).split(b"\n", 1)[0])
            assert first["domain"] == domain and first["text"]
