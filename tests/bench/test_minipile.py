"""The minipile corpus ships inside the package and is `mixer bench quality`'s default."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import mixer.bench
from mixer.bench.corpus import default_corpus


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


def test_corpora_of_linked_domain_folders_get_their_own_prepared_cache(tmp_path) -> None:
    """Two corpora assembled from symbolic links to different domains of the bundled corpus are
    prepared into different cache folders (their fingerprints see the linked files)."""
    from mixer.bench.corpus import prepare

    domains = sorted(d for d in default_corpus().iterdir() if d.is_dir())
    roots = []
    for name, picked in (("a", domains[:1]), ("b", domains[1:2])):
        corpus = tmp_path / name
        corpus.mkdir()
        for d in picked:
            (corpus / d.name).symlink_to(d, target_is_directory=True)
        root, prefixes = prepare(corpus, tmp_path / "cache", progress=False)
        assert sorted(prefixes) == [d.name for d in picked]
        roots.append(root)
    assert roots[0] != roots[1]
