"""DSIR over word chunks (`chunk_words`): the authors' cut, the layout `mixer data prepare` reads,
the report's counts, the length bias that chunks remove, and bad settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mixer.select import SelectError, select_dsir
from mixer.select.features import NgramHasher, split_chunks
from tests.selection.conftest import DATA, authors_chunks, domains, read_texts

LOCAL = {"ray_address": None, "progress": False, "min_words": 10}


def test_split_chunks_cuts_as_the_authors_do():
    cases = json.loads((DATA / "chunks.json").read_text())["cases"]
    for case in cases:
        assert split_chunks(case["text"], case["chunk_words"]) == case["chunks"], case
    texts = [t for d in domains() for t in read_texts(DATA / "raw" / d / "train.jsonl")]
    for n in (1, 7, 32, 128):
        for text in texts:
            chunks = split_chunks(text, n)
            assert chunks == authors_chunks(text, n)
            assert " ".join(chunks) == text  # contiguous pieces of the document
            assert all(len(c.split(" ")) == n for c in chunks[:-1]) and len(chunks[-1].split(" ")) <= n


def test_chunks_are_written_in_prepares_layout_and_counted_in_the_report(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from mixer.megatron.data import decode, prepare_corpus

    out = tmp_path / "sel"
    n, k = 24, 100
    report = select_dsir(DATA / "target.jsonl", [DATA / "raw"], out, num_samples=k, chunk_words=n, **LOCAL)
    h = NgramHasher()
    raw = {d: read_texts(DATA / "raw" / d / "train.jsonl") for d in domains()}
    units = {d: [c for t in texts for c in authors_chunks(t, n)] for d, texts in raw.items()}
    assert report["unit"] == "24-word chunk" and report["settings"]["chunk_words"] == n
    assert report["raw_docs"] == sum(map(len, raw.values()))
    assert report["raw_units"] == sum(map(len, units.values()))
    assert report["eligible_docs"] == sum(h.buckets(c)[1] >= 10 for u in units.values() for c in u)
    assert report["selected_docs"] == k == sum(row["selected"] for row in report["domains"].values())
    pairs = json.loads((out / "dsir_selected.json").read_text())
    for d in domains():
        assert report["domains"][d]["units"] == len(units[d])
        assert len(pairs[d]) == report["domains"][d]["selected"]
        assert pairs[d] == sorted(pairs[d]) and len({tuple(p) for p in pairs[d]}) == len(pairs[d])
        if not pairs[d]:
            continue
        lines = (out / d / "train.jsonl").read_text(encoding="utf-8").splitlines()
        assert [json.loads(line)["text"] for line in lines] == [
            authors_chunks(raw[d][i], n)[c] for i, c in pairs[d]
        ]
        assert (out / d / "val.jsonl").read_bytes() == (DATA / "raw" / d / "val.jsonl").read_bytes()
        assert report["domains"][d]["selected_bytes"] == sum(len(line.encode()) + 1 for line in lines)
    prefixes = prepare_corpus(out, tmp_path / "prepared", progress=False)
    assert sorted(prefixes) == sorted(d for d in domains() if pairs[d])
    for d, split in prefixes.items():
        ds = IndexedDataset(split["train"])
        assert len(ds) == len(pairs[d])
        assert decode(ds[0][:-1]) == read_texts(out / d / "train.jsonl")[0]


def test_other_fields_of_a_chunked_document_are_kept(tmp_path):
    raw = tmp_path / "raw" / "notes"
    raw.mkdir(parents=True)
    text = " ".join(f"word{i}" for i in range(50))
    (raw / "train.jsonl").write_text(json.dumps({"id": "doc-1", "text": text, "meta": {"lang": "é"}}) + "\n")
    (raw / "val.jsonl").write_text(json.dumps({"text": "held out"}) + "\n")
    report = select_dsir(
        DATA / "target.jsonl",
        [raw],
        tmp_path / "sel",
        fraction=1.0,
        chunk_words=20,
        **{**LOCAL, "min_words": 0},
    )
    assert report["selected_docs"] == 3
    rows = [
        json.loads(line) for line in (tmp_path / "sel" / "notes" / "train.jsonl").read_text().splitlines()
    ]
    assert rows == [{"id": "doc-1", "text": c, "meta": {"lang": "é"}} for c in split_chunks(text, 20)]
    assert json.loads((tmp_path / "sel" / "dsir_selected.json").read_text()) == {
        "notes": [[0, 0], [0, 1], [0, 2]]
    }


def _length_corpus(root: Path) -> Path:
    """Two raw domains of the same python documents: `joined` holds them ten at a time in one
    document, `single` one by one; and kjv, far from the target."""
    docs = read_texts(DATA / "raw" / "python_code" / "train.jsonl")
    groups = {
        "joined": [" ".join(docs[i : i + 10]) for i in range(0, len(docs), 10)],
        "single": docs,
        "kjv": read_texts(DATA / "raw" / "kjv" / "train.jsonl"),
    }
    for name, texts in groups.items():
        (root / name).mkdir(parents=True)
        (root / name / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        (root / name / "val.jsonl").write_text(json.dumps({"text": texts[0]}) + "\n")
    return root


def test_chunks_remove_the_length_bias_of_whole_documents(tmp_path):
    raw = _length_corpus(tmp_path / "raw")
    whole = select_dsir(DATA / "target.jsonl", [raw], tmp_path / "whole", num_samples=20, **LOCAL)
    # Whole documents: the same python text, ten to a document, is never chosen (each of its log
    # weights sums ten documents' n-grams, here mostly negative ones).
    assert whole["domains"]["joined"]["selected"] == 0 and whole["domains"]["single"]["selected"] >= 15
    # Chunks of equal size (min_words drops the short last chunk of each document): the same text
    # is chosen about as often however it was split into documents, and kjv not at all.
    cut = select_dsir(
        DATA / "target.jsonl",
        [raw],
        tmp_path / "cut",
        num_samples=60,
        chunk_words=32,
        **{**LOCAL, "min_words": 30},
    )
    rows = cut["domains"]
    assert rows["joined"]["selected"] + rows["single"]["selected"] == 60 and rows["kjv"]["selected"] == 0
    assert 2 / 3 < rows["joined"]["selected"] / rows["single"]["selected"] < 3 / 2
    assert 2 / 3 < rows["joined"]["selected_bytes"] / rows["single"]["selected_bytes"] < 3 / 2


def test_bad_chunk_words_is_named(tmp_path):
    for bad in (-1, 1 << 21, True, 2.5, "128"):
        with pytest.raises(SelectError, match=r"chunk_words must be an integer in \[0, 1048576\]"):
            select_dsir(
                DATA / "target.jsonl", [DATA / "raw"], tmp_path / "x", num_samples=5, chunk_words=bad, **LOCAL
            )
    assert not (tmp_path / "x").exists()
    with pytest.raises(SelectError, match="asked for 5000 24-word chunks but only"):
        select_dsir(
            DATA / "target.jsonl", [DATA / "raw"], tmp_path / "x", num_samples=5000, chunk_words=24, **LOCAL
        )


def test_command_line_chunk_words(tmp_path):
    from click.testing import CliRunner

    from mixer.cli import main

    args = [
        "data",
        "select",
        str(DATA / "raw"),
        "--target",
        str(DATA / "target.jsonl"),
        "--num-samples",
        "50",
    ]
    args += ["--min-words", "10", "--ray-address", "none", "--chunk-words"]
    run = CliRunner().invoke(
        main, [*args, "32", "--out", str(tmp_path / "cli"), "--json"], catch_exceptions=False
    )
    assert run.exit_code == 0, run.output
    assert json.loads(run.output.strip().splitlines()[-1])["unit"] == "32-word chunk"
    select_dsir(
        DATA / "target.jsonl", [DATA / "raw"], tmp_path / "fn", num_samples=50, chunk_words=32, **LOCAL
    )
    assert (tmp_path / "cli" / "dsir_selected.json").read_text() == (
        tmp_path / "fn" / "dsir_selected.json"
    ).read_text()
    bad = CliRunner().invoke(main, [*args, "-1", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "--chunk-words" in bad.output
