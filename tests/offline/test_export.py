"""`mixer export` / `mixer import`: Parquet and CSV read back to the same numbers; import reproduces versions."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.csv as pacsv
import pytest

from mixer.export import read
from mixer.replay import iter_log
from mixer.store import Store
from tests.offline.recording import DOMAINS


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_versions_and_weights_read_back_exactly(recorded, cli, tmp_path, fmt):
    _, db = recorded
    store = Store(db)
    rec = store.get_job("rec")
    stored = store.versions(rec.id)
    for what in ("versions", "weights"):
        out = tmp_path / f"rec-{what}.{fmt}"
        code, _, doc = cli("export", "rec", "--what", what, "--format", fmt, "-o", out, "--db", db, "--json")
        assert code == 0 and doc["rows"] == len(stored)
        table, meta = read(out)
        assert meta["job"] == "rec" and meta["what"] == what and json.loads(meta["spec"])["name"] == "rec"
        assert table.column("version").to_pylist() == [v.version for v, _ in stored]
        assert table.column("effective_step").to_pylist() == [v.effective_step for v, _ in stored]
        w = np.column_stack([table.column(f"weight/{d}").to_numpy() for d in DOMAINS])
        assert np.array_equal(w, np.array([v.weights for v, _ in stored]))  # bit for bit, CSV included
        if what == "versions":
            assert [json.loads(p) for p in table.column("params_json").to_pylist()] == [
                v.params for v, _ in stored
            ]
            assert table.column("log_seq").to_pylist() == [v.log_seq for v, _ in stored]
    store.close()


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_signals_read_back_exactly(recorded, cli, tmp_path, fmt):
    _, db = recorded
    store = Store(db)
    rec = store.get_job("rec")
    log = list(iter_log(store, rec.id, len(DOMAINS)))
    out = tmp_path / f"rec-signals.{fmt}"
    code, _, doc = cli("export", "rec", "--what", "signals", "--format", fmt, "-o", out, "--db", db, "--json")
    assert code == 0 and doc["rows"] == len(log) == 300
    table, meta = read(out)
    assert meta["what"] == "signals" and meta["log_job"] == "rec"
    assert table.column("seq").to_pylist() == [s for s, _ in log]
    assert table.column("source").to_pylist() == [r.source for _, r in log]
    for field in ("domain_loss_sum", "domain_token_count", "domain_sample_count", "excess_loss_sum"):
        got = np.column_stack([table.column(f"{field}/{d}").to_numpy() for d in DOMAINS])
        assert np.array_equal(got, np.array([getattr(r, field) for _, r in log])), field
    assert np.array_equal(table.column("extra/lr").to_numpy(), [r.extra["lr"] for _, r in log])
    want_loss = np.concatenate([r.sample_loss for _, r in log])
    want_dom = np.concatenate([r.sample_domain for _, r in log])
    if fmt == "parquet":
        assert [len(x) for x in table.column("sample_loss").to_pylist()] == [
            r.sample_loss.size for _, r in log
        ]
        assert np.array_equal(table.column("sample_loss").combine_chunks().flatten().to_numpy(), want_loss)
        assert np.array_equal(table.column("sample_domain").combine_chunks().flatten().to_numpy(), want_dom)
    else:
        flat = pacsv.read_csv(tmp_path / "rec-signals.samples.csv")
        assert meta["samples_file"] == "rec-signals.samples.csv"
        assert np.array_equal(flat.column("sample_loss").to_numpy().astype(np.float32), want_loss)
        assert np.array_equal(flat.column("sample_domain").to_numpy(), want_dom)
        assert flat.column("seq").to_pylist() == [s for s, r in log for _ in range(r.sample_loss.size)]
    store.close()


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_import_into_a_second_database_reproduces_the_versions(recorded, cli, tmp_path, fmt):
    _, db = recorded
    out = tmp_path / f"rec-versions.{fmt}"
    assert cli("export", "rec", "--what", "versions", "-o", out, "--db", db)[0] == 0
    other = str(tmp_path / "other.db")
    code, _, doc = cli("import", out, "--as", "rec-copy", "--db", other, "--json")
    assert code == 0 and doc["written"] and doc["source_job"] == "rec"
    code, _, doc = cli("import", out, "--as", "rec-copy", "--db", other, "--json")
    assert code == 0 and not doc["written"]  # idempotent

    src, dst = Store(db), Store(other)
    want = [v for v, _ in src.versions(src.get_job("rec").id)]
    copy = dst.get_job("rec-copy")
    got = [v for v, _ in dst.versions(copy.id)]
    assert len(got) == len(want) and all(a.same_as(b) and a.log_seq == b.log_seq for a, b in zip(got, want))
    assert json.loads(copy.spec_json)["name"] == "rec-copy" and copy.source_job == "rec"
    # Versions only: verification needs the log, which stayed in the source database.
    code, out_text, _ = cli("replay", "rec-copy", "--verify", "--db", other)
    assert code == 1 and "has no log" in out_text
    src.close()
    dst.close()


def test_import_refuses_a_weights_export(recorded, cli, tmp_path):
    _, db = recorded
    out = tmp_path / "w.parquet"
    assert cli("export", "rec", "--what", "weights", "-o", out, "--db", db)[0] == 0
    code, text, _ = cli("import", out, "--db", str(tmp_path / "x.db"))
    assert code == 1 and "only a `--what versions` export" in text


def test_several_topics_per_sample_export(recorded, cli, tmp_path):
    """Samples labelled with several topics (a (samples, labels) row padded with -1) export as lists."""
    from mixer.client import MixerClient
    from mixer.signals import Report

    srv, db = recorded
    rng = np.random.default_rng(0)
    spec = {"name": "multi-topic", "domains": [{"name": d} for d in DOMAINS], "strategy": {"name": "static"}}
    sent = []
    with MixerClient(srv.address) as c:
        c.create_job(spec)
        for step in range(3):
            n, width = 5, int(rng.integers(1, 4))
            topics = rng.integers(0, 9, size=(n, width)).astype(np.int32)
            topics[rng.random((n, width)) < 0.3] = -1
            topics[:, 0] = np.abs(topics[:, 0])  # every sample has at least one topic
            c.report(
                "multi-topic",
                Report(
                    step=step,
                    source="rank0",
                    sample_loss=rng.random(n).astype(np.float32),
                    sample_domain=np.zeros(n, np.int32),
                    sample_topic=topics,
                ),
            )
            sent.append([[int(t) for t in row if t >= 0] for row in topics])
    out = tmp_path / "mt.parquet"
    code, output, _ = cli(
        "export", "multi-topic", "--what", "signals", "--format", "parquet", "-o", out, "--db", db
    )
    assert code == 0, output
    table, _ = read(out)
    assert table.column("sample_topic").to_pylist() == sent
    csv = tmp_path / "mt.csv"
    code, output, _ = cli(
        "export", "multi-topic", "--what", "signals", "--format", "csv", "-o", csv, "--db", db
    )
    assert code == 0, output
    flat = pacsv.read_csv(
        tmp_path / "mt.samples.csv", convert_options=pacsv.ConvertOptions(strings_can_be_null=False)
    )
    cells = [str(x) for x in flat.column("sample_topic").to_pylist()]
    assert cells == [" ".join(map(str, ids)) for rows in sent for ids in rows]
