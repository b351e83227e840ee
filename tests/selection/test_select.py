"""`select_dsir` end to end on the stored tiny inputs: the layout `mixer data prepare` reads, the report
(KL reduction re-derived from the written files), the prior job spec, determinism, Ray, bad input."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mixer.select import SelectError, select_dsir
from mixer.select.shards import iter_docs, make_shards
from mixer.spec import JobSpec
from tests.selection.conftest import DATA, bag, domains, kl, read_texts

K = 30
LOCAL = {"ray_address": None, "progress": False, "min_words": 10}


def _run(out: Path, **kw) -> dict:
    target, raw = kw.pop("target", DATA / "target.jsonl"), kw.pop("raw", [DATA / "raw"])
    return select_dsir(target, raw, out, **{"num_samples": K, "seed": 0, **LOCAL, **kw})


def _ids(out: Path) -> dict[str, list[int]]:
    return json.loads((out / "dsir_selected.json").read_text())


def test_output_is_prepared_by_mixer_data_prepare_and_the_report_rederives(tmp_path):
    out = tmp_path / "sel"
    report = _run(out, prefix_root=str(tmp_path / "prepared"))
    ids = _ids(out)
    assert sorted(ids) == domains() and sum(map(len, ids.values())) == K == report["selected_docs"]
    chosen: list[str] = []
    for d in domains():
        raw = read_texts(DATA / "raw" / d / "train.jsonl")
        want = [raw[i] for i in ids[d]]
        assert report["domains"][d]["selected"] == len(want)
        if not want:
            assert not (out / d).exists()
            continue
        assert read_texts(out / d / "train.jsonl") == want
        assert (out / d / "val.jsonl").read_bytes() == (DATA / "raw" / d / "val.jsonl").read_bytes()
        chosen += want
    # The KL reduction in the report, re-derived from the files it describes.
    target = bag(read_texts(DATA / "target.jsonl"), 10_000)
    raw_all = bag([t for d in domains() for t in read_texts(DATA / "raw" / d / "train.jsonl")], 10_000)
    expected = kl(target, raw_all) - kl(target, bag(chosen, 10_000))
    assert report["kl_reduction"] == pytest.approx(expected, rel=1e-9)
    assert report["kl_reduction_vs_random_sample"] == pytest.approx(
        report["kl_target_random"] - report["kl_target_selected"], rel=1e-12
    )
    # The raw domain nearest the target (by KL of the bags) is over-represented in the choice.
    texts = {d: read_texts(DATA / "raw" / d / "train.jsonl") for d in domains()}
    nearest = min(domains(), key=lambda d: kl(target, bag(texts[d], 10_000)))
    share_raw = len(texts[nearest]) / sum(map(len, texts.values()))
    assert len(ids[nearest]) / K > 1.5 * share_raw
    assert max(report["prior"], key=report["prior"].get) == nearest
    assert json.loads((out / "dsir_report.json").read_text())["kl_reduction"] == report["kl_reduction"]
    # The prior: a job spec whose weights are the importance mass per raw domain.
    spec = JobSpec.from_yaml((out / "dsir_prior.yaml").read_text())
    assert spec.domain_names == domains()
    np.testing.assert_allclose(spec.prior(), [report["prior"][d] for d in domains()], rtol=1e-12)
    # `mixer data prepare` turns the output into Megatron indexed datasets, one document per line.
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from mixer.megatron.data import decode, prepare_corpus

    prefixes = prepare_corpus(out, tmp_path / "prepared", progress=False)
    assert sorted(prefixes) == sorted(d for d in domains() if ids[d])
    assert all(spec.domains[domains().index(d)].prefix == p["train"] for d, p in prefixes.items())
    for d, split in prefixes.items():
        ds = IndexedDataset(split["train"])
        assert len(ds) == len(ids[d])
        assert decode(ds[0][:-1]) == read_texts(out / d / "train.jsonl")[0]
    assert not list(tmp_path.glob(".sel.*"))


def test_choice_is_deterministic_per_seed_and_the_same_from_gzip(tmp_path):
    # With the raw data itself as the target every importance weight is 1: DSIR is uniform random
    # sampling, so the seed alone decides, and each domain's importance mass is its share of documents.
    whole = tmp_path / "whole.jsonl"
    whole.write_bytes(b"".join((DATA / "raw" / d / "train.jsonl").read_bytes() for d in domains()))
    a, b, _c = (_run(tmp_path / n, seed=s, target=whole) for n, s in (("a", 0), ("b", 0), ("c", 1)))
    assert _ids(tmp_path / "a") == _ids(tmp_path / "b") and a["kl_reduction"] == b["kl_reduction"]
    assert _ids(tmp_path / "a") != _ids(tmp_path / "c")
    for d, row in a["domains"].items():
        assert a["prior"][d] == pytest.approx(row["eligible"] / a["eligible_docs"], rel=1e-12)
    # method="random" is exactly that draw, whatever the target.
    r = _run(tmp_path / "r", seed=0, method="random")
    assert (
        _ids(tmp_path / "r") == _ids(tmp_path / "a") and r["prior"] == a["prior"] and r["method"] == "random"
    )
    _run(tmp_path / "t", seed=0)
    gz = tmp_path / "gz"
    for d in domains():
        (gz / d).mkdir(parents=True)
        for split in ("train", "val"):
            data = (DATA / "raw" / d / f"{split}.jsonl").read_bytes()
            (gz / d / f"{split}.jsonl.gz").write_bytes(gzip.compress(data))
    _run(tmp_path / "g", raw=[gz / d for d in domains()], seed=0)
    assert _ids(tmp_path / "g") == _ids(tmp_path / "t")
    for d in (d for d, ix in _ids(tmp_path / "t").items() if ix):
        with gzip.open(tmp_path / "g" / d / "train.jsonl.gz", "rt", encoding="utf-8") as fh:
            assert [json.loads(line)["text"] for line in fh] == read_texts(tmp_path / "t" / d / "train.jsonl")


@pytest.mark.parametrize("shard_bytes", [4096, 5000, 1 << 20])
def test_byte_range_shards_read_every_document_once(shard_bytes):
    for d in domains():
        path = DATA / "raw" / d / "train.jsonl"
        shards = make_shards(d, path, shard_bytes, 0)
        assert len(shards) == max(1, -(-path.stat().st_size // shard_bytes))
        assert [t for s in shards for t, _ in iter_docs(s)] == read_texts(path)


@pytest.mark.ray
def test_ray_tasks_choose_what_this_process_chooses(tmp_path):
    local = _run(tmp_path / "local", shard_bytes=4096, fraction=0.25, num_samples=None)
    on_ray = _run(
        tmp_path / "ray", shard_bytes=4096, fraction=0.25, num_samples=None, ray_address="local", num_cpus=2
    )
    assert on_ray["shards"] == local["shards"] > len(domains())
    assert _ids(tmp_path / "ray") == _ids(tmp_path / "local")
    assert on_ray["kl_reduction"] == local["kl_reduction"] and on_ray["prior"] == local["prior"]


def _write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_bad_input_is_named_and_leaves_nothing_behind(tmp_path):
    out = tmp_path / "sel"
    cases: list[tuple[dict, str]] = [
        ({"target": _write(tmp_path / "empty.jsonl", [])}, "target has no documents"),
        ({"target": _write(tmp_path / "blank.jsonl", ["", "  "])}, "no documents"),
        ({"target": _write(tmp_path / "punct.jsonl", ['{"text": "   "}'])}, "target documents have no words"),
        ({"target": tmp_path / "missing.jsonl"}, "target file not found"),
        ({"raw": [DATA / "raw", tmp_path]}, "not a domain folder"),
        ({"raw": [tmp_path / "nope"]}, "raw domain folder not found"),
        ({"raw": [DATA / "raw", DATA / "raw" / domains()[0]]}, "given twice"),
        ({"num_samples": 10_000}, "too few samples: asked for 10000"),
        ({"num_samples": None, "fraction": 1.5}, r"fraction must lie in \(0, 1\]"),
        ({"num_samples": None}, "exactly one of num_samples and fraction"),
        ({"seed": -1}, "seed must be an integer"),
        ({"method": "best"}, "method must be one of dsir, random"),
        ({"num_buckets": 1}, "num_buckets must be an integer"),
        ({"shard_bytes": 10}, "shard_bytes"),
        ({"bogus": 1}, "bogus"),
        ({"job_name": "no spaces"}, "job_name 'no spaces' must be"),
    ]
    name = domains()[1]
    lines = (DATA / "raw" / name / "train.jsonl").read_text().splitlines()
    for folder, broken, message in (
        (
            "bad_text",
            [*lines[:5], '{"text": 3}', *lines[5:]],
            rf'{name}/train.jsonl:6: "text" must be a string, got int',
        ),
        ("bad_json", [*lines[:2], "{not json", *lines[2:]], rf"{name}/train.jsonl:3: invalid JSON"),
    ):
        shutil.copytree(DATA / "raw", tmp_path / folder)
        _write(tmp_path / folder / name / "train.jsonl", broken)
        cases.append(({"raw": [tmp_path / folder]}, message))
    for kw, message in cases:
        with pytest.raises(SelectError, match=message):
            _run(out, **kw)
        assert not out.exists() and not list(tmp_path.glob(".sel.*")), kw
    _write(out / "keep.txt", ["x"])
    with pytest.raises(SelectError, match="exists and is not empty"):
        _run(out)
    assert (out / "keep.txt").is_file()


def test_command_line_selects_what_the_function_selects(tmp_path):
    from click.testing import CliRunner

    from mixer.cli import main

    args = [
        "data",
        "select",
        str(DATA / "raw"),
        "--target",
        str(DATA / "target.jsonl"),
        "--num-samples",
        str(K),
        "--min-words",
        "10",
        "--ray-address",
        "none",
    ]
    run = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "cli"), "--json"], catch_exceptions=False)
    assert run.exit_code == 0, run.output
    assert json.loads(run.output.strip().splitlines()[-1])["selected_docs"] == K
    _run(tmp_path / "fn")
    assert _ids(tmp_path / "cli") == _ids(tmp_path / "fn")
    again = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "cli")])  # the folder is not empty now
    assert again.exit_code == 1 and "not empty" in again.output
