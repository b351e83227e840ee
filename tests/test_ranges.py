"""Every value has a range (README.md, "Security and reliability"): what a worker or a spec sends, and what the service
derives from it, is bounded; a value outside its range is refused with INVALID_ARGUMENT naming
the field and changes nothing, and no accepted value can fail another job's commit or make a
strategy's state non-finite."""

from __future__ import annotations

import json
import threading
import time

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixer.agent.policy import fresh_model
from mixer.client import MixerClient
from mixer.engine import Engine, Version
from mixer.signals import (
    MAX_LOSS,
    MAX_REPORT_SAMPLES,
    MAX_STEP,
    MAX_TOKENS,
    Report,
    SignalError,
    validate_report,
)
from mixer.spec import MAX_DOMAIN_WEIGHT, MAX_SPEC_BYTES, MAX_SPEC_DEPTH, CadenceSpec, JobSpec, SpecError
from mixer.store import Append, LogEntry, Store
from mixer.store.writer import GroupCommitWriter
from mixer.strategies import REGISTRY
from mixer.v1 import mixer_pb2 as pb

K = 3
INT64_MAX = (1 << 63) - 1


def loss_report(step: int, source: str = "w", seq: int = 0) -> Report:
    return Report(
        step=step,
        source=source,
        seq=seq,
        domain_loss_sum=np.array([10.0, 20.0, 30.0]),
        domain_token_count=np.array([10.0, 10.0, 10.0]),
        domain_sample_count=np.array([1, 1, 1]),
    )


def job_spec(name: str, **cadence) -> dict:
    return {
        "name": name,
        "domains": ["a", "b", "c"],
        "strategy": "odm",
        "cadence": {"update_every": 1, **cadence},
    }


def log_rows(db: str, job: str) -> list[tuple]:
    store = Store(db, migrate=False)
    try:
        rec = store.get_job(job)
        return [(s.seq, s.step, s.source, s.source_seq, s.num_samples) for s in store.signals(rec.id)]
    finally:
        store.close()


def stored_versions(db: str, job: str) -> list[tuple]:
    store = Store(db, migrate=False)
    try:
        rec = store.get_job(job)
        return [(v.version, v.effective_step) for v, _ in store.versions(rec.id)]
    finally:
        store.close()


def refused(client: MixerClient, job: str, msg, *needles: str) -> str:
    with pytest.raises(grpc.RpcError) as err:
        client.report(job, msg)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    for needle in needles:
        assert needle in err.value.details(), err.value.details()
    return err.value.details()


# -- 1. steps far in the future -------------------------------------------------------------------

AHEAD_CASES = [
    # (cadence settings, the bound they give: max_step_ahead, or max_step_lag when it is not set)
    ({}, CadenceSpec().max_step_lag),
    ({"max_step_lag": 50}, 50),
    ({"max_step_lag": 50, "max_step_ahead": 7}, 7),
]


@pytest.mark.parametrize(("cadence", "ahead"), AHEAD_CASES)
def test_step_far_ahead_is_refused_and_changes_nothing(server, cadence, ahead):
    name = f"ahead{len(cadence)}"
    with MixerClient(server.address) as c:
        c.create_job(job_spec(name, **cadence))
        # Before any report the newest step counts as 0.
        refused(c, name, loss_report(ahead + 1), "step", "max_step_ahead")
        for step in range(5):
            c.report(name, loss_report(step))
        newest = 4
        log, versions, job = log_rows(server.db, name), stored_versions(server.db, name), c.get_job(name)
        for step in (newest + ahead + 1, MAX_STEP - 1, MAX_STEP, INT64_MAX):
            refused(c, name, loss_report(step), "step")
        assert log_rows(server.db, name) == log, "a refused report changed the log"
        assert stored_versions(server.db, name) == versions
        after = c.get_job(name)
        assert (after.max_step, after.latest_version, after.report_count) == (
            job.max_step,
            job.latest_version,
            job.report_count,
        )
        # The job still serves honest workers, at the edge of the bound too.
        c.report(name, loss_report(newest + 1))
        resp = c.report(name, loss_report(newest + 1 + ahead))
        assert not resp.duplicate
        assert resp.latest.effective_step == newest + 1 + ahead + CadenceSpec().delay


# -- 2. derived integers, and one job's bad row in a shared commit -------------------------------

SPEC_INTEGER_CASES = [
    ("cadence.delay", {"cadence": {"delay": 1 << 62}}),
    ("cadence.delay", {"cadence": {"delay": MAX_STEP}}),
    ("cadence.update_every", {"cadence": {"update_every": INT64_MAX}}),
    ("cadence.warmup_steps", {"cadence": {"warmup_steps": 1 << 63}}),
    ("cadence.max_step_lag", {"cadence": {"max_step_lag": 1 << 64}}),
    ("cadence.max_step_ahead", {"cadence": {"max_step_ahead": 0}}),
    ("cadence.max_step_ahead", {"cadence": {"max_step_ahead": MAX_STEP}}),
    ("cadence.snapshot_every", {"cadence": {"snapshot_every": 1 << 70}}),
    ("seed", {"seed": 1 << 63}),
    ("domains[0].weight", {"domains": [{"name": "a", "weight": 1e308}, {"name": "b", "weight": 1e308}]}),
    ("domains[1].weight", {"domains": [{"name": "a"}, {"name": "b", "weight": MAX_DOMAIN_WEIGHT * 2}]}),
    ("domains[0].size", {"domains": [{"name": "a", "size": 1e300}]}),
    ("cadence.prior_smoothing", {"cadence": {"prior_smoothing": "half"}}),
]


@pytest.mark.parametrize(
    ("field", "override"), SPEC_INTEGER_CASES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(SPEC_INTEGER_CASES)]
)
def test_spec_numbers_out_of_range_name_the_field(field, override):
    data = {"name": "j", "domains": ["a", "b"], **override}
    with pytest.raises(SpecError) as err:
        JobSpec.from_dict(data)
    assert err.value.field == field, str(err.value)


def test_spec_numbers_at_their_bounds_are_accepted():
    top = MAX_STEP - 1
    spec = JobSpec.from_dict(
        {
            "name": "j",
            "domains": [
                {"name": "a", "weight": MAX_DOMAIN_WEIGHT, "size": MAX_DOMAIN_WEIGHT},
                {"name": "b", "weight": MAX_DOMAIN_WEIGHT},
            ],
            "cadence": {
                "delay": top,
                "update_every": top,
                "max_step_lag": top,
                "max_step_ahead": top,
                "snapshot_every": top,
            },
            "seed": INT64_MAX,
        }
    )
    assert spec.prior() == [0.5, 0.5]
    assert spec.cadence.step_ahead == top


def test_max_step_ahead_left_out_keeps_old_fingerprints():
    data = {"name": "j", "domains": ["a", "b"]}
    spec = JobSpec.from_dict(data)
    assert "max_step_ahead" not in json.loads(spec.to_json())["cadence"]
    assert JobSpec.from_json(spec.to_json()).fingerprint() == spec.fingerprint()
    pinned = JobSpec.from_dict({**data, "cadence": {"max_step_ahead": 5}})
    assert json.loads(pinned.to_json())["cadence"]["max_step_ahead"] == 5
    assert JobSpec.from_json(pinned.to_json()).cadence.step_ahead == 5


def _version(number: int, effective_step: int) -> Version:
    return Version(number, effective_step, np.full(K, 1.0 / K), trigger_step=0, log_seq=-1)


def test_one_jobs_bad_row_cannot_fail_another_jobs_commit(sqlite_url):
    """The writer groups appends of many jobs into one transaction; a row that cannot be stored
    fails only its own job's append."""
    store = Store(sqlite_url)
    good_a, _ = store.create_job("good-a", "{}", "f", "static")
    bad, _ = store.create_job("bad", "{}", "f", "static")
    good_b, _ = store.create_job("good-b", "{}", "f", "static")
    hold, go = threading.Event(), threading.Event()

    def on_commit(seconds: float, n: int) -> None:
        hold.set()
        go.wait(10)  # the next appends queue up meanwhile: they are committed as one batch

    writer = GroupCommitWriter(store, on_commit=on_commit)
    try:
        first = writer.submit(Append(good_a.id, versions=[_version(0, 0)]))
        assert hold.wait(10)
        futures = {
            "good-a": writer.submit(Append(good_a.id, versions=[_version(1, 5)])),
            "bad": writer.submit(Append(bad.id, versions=[_version(0, INT64_MAX + 1)])),
            "good-b": writer.submit(Append(good_b.id, versions=[_version(0, 3)])),
        }
        go.set()
        first.result(10)
        assert futures["bad"].exception(10) is not None
        futures["good-a"].result(10)
        futures["good-b"].result(10)
        assert [v.version for v, _ in store.versions(good_a.id)] == [0, 1]
        assert [v.effective_step for v, _ in store.versions(good_b.id)] == [3]
        assert store.versions(bad.id) == []
        # The bad job stays failed until its runtime reloads (a barrier), then commits again.
        assert writer.submit(Append(bad.id, versions=[_version(0, 1)])).exception(10) is not None
        writer.barrier(bad.id).result(10)
        writer.submit(Append(bad.id, versions=[_version(0, 1)])).result(10)
    finally:
        go.set()
        writer.close()
        store.close()


def _bad_signals(step: int) -> list[tuple[pb.Signals, str]]:
    """Reports whose derived values would not fit the store, and the field each names."""
    near = pb.Signals(step=INT64_MAX, source="evil", domain_loss_sum=[1, 1, 1], domain_token_count=[1, 1, 1])
    counts = pb.Signals(step=step, source="evil", domain_sample_count=[INT64_MAX, INT64_MAX, 2])
    wide = pb.Signals(step=step, source="evil", seq=1, domain_sample_count=[MAX_REPORT_SAMPLES, 1, 0])
    return [(near, "step"), (counts, "domain_sample_count"), (wide, "domain_sample_count")]


def test_bad_values_of_one_job_leave_another_jobs_reports_alone(db_url, server_factory):
    srv = server_factory(db_url)
    with MixerClient(srv.address) as c:
        c.create_job(job_spec("victim"))
        c.create_job(job_spec("evil"))
        stop = threading.Event()
        answers: list[str] = []

        def attack() -> None:
            with MixerClient(srv.address) as ec:
                step = 0
                honest = f"honest-{threading.get_ident()}"
                while not stop.is_set():
                    for msg, field in _bad_signals(step) * 5:
                        try:
                            ec.report("evil", msg)
                            answers.append("accepted")
                        except grpc.RpcError as e:
                            answers.append(f"{e.code().name} {field in e.details()}")
                    try:
                        ec.report("evil", loss_report(step, honest))
                    except grpc.RpcError as e:
                        answers.append(f"honest report refused: {e.code().name}")
                    step += 1

        attackers = [threading.Thread(target=attack) for _ in range(4)]
        for t in attackers:
            t.start()
        sources, n = [f"rank{i}" for i in range(6)], 100
        acked: dict[tuple[str, int], int] = {}
        failed: list[str] = []

        def victim(source: str) -> None:
            with MixerClient(srv.address) as vc:
                for step in range(n):
                    try:
                        acked[source, step] = vc.report("victim", loss_report(step, source)).log_seq
                    except grpc.RpcError as e:
                        failed.append(f"{source} step {step}: {e.code().name} {e.details()}")

        victims = [threading.Thread(target=victim, args=(s,)) for s in sources]
        try:
            for t in victims:
                t.start()
            for t in victims:
                t.join(120)
        finally:
            stop.set()
            for t in attackers:
                t.join(30)
        assert not failed, failed[:3]
        assert answers and set(answers) == {"INVALID_ARGUMENT True"}, sorted(set(answers))
        stored = {(row[2], row[1]): row[0] for row in log_rows(srv.db, "victim")}
        assert stored == acked and len(acked) == len(sources) * n
        assert all(row[2].startswith("honest-") for row in log_rows(srv.db, "evil"))
        with pytest.raises(grpc.RpcError) as err:
            c.create_job(job_spec("evil2", delay=1 << 62))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cadence.delay" in err.value.details()
        assert "evil2" not in [j.name for j in c.list_jobs()]


# -- 3. YAML aliases, nesting and size -------------------------------------------------------------


def alias_bomb(levels: int, fan: int) -> str:
    """A data_path list that expands to fan**levels prefixes through nested aliases."""
    lines = ["name: bomb", f"l0: &l0 [{', '.join(['p'] * fan)}]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * fan)}]")
    lines.append(f"data_path: *l{levels - 1}")
    return "\n".join(lines) + "\n"


def test_yaml_aliases_are_refused_before_they_expand(server):
    text = alias_bomb(5, 10)  # 100,000 prefixes (a few seconds and a 5 MB job before the fix)
    assert len(text) < 1000
    with MixerClient(server.address, timeout=60) as c:
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            c.create_job(text)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "alias" in err.value.details()
        assert time.monotonic() - t0 < 5
        assert "bomb" not in [j.name for j in c.list_jobs()]
        # An anchor alone is refused too; the same spec written out is fine.
        with pytest.raises(grpc.RpcError) as err:
            c.create_job("name: anch\ndomains: &d [a, b]\n")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "anchor" in err.value.details()
        assert c.create_job("name: anch\ndomains: [a, b]\n")[1]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (
            "name: deep\ndomains: [a]\nstrategy: {name: static, params: {schedule: "
            + "[" * 100_000
            + "]" * 100_000
            + "}}\n",
            "nested",
        ),
        (
            '{"name": "deep", "domains": ["a"], "strategy": {"name": "static", "params": {"x": '
            + "[" * 100_000
            + "]" * 100_000
            + "}}}",
            "nested",
        ),
        (
            '{"name": "deep", "domains": ["a"], "seed": '
            + "[" * (MAX_SPEC_DEPTH + 1)
            + "]" * (MAX_SPEC_DEPTH + 1)
            + "}",
            "nested",
        ),
        ("name: big\ndomains: [a]\n#" + "x" * MAX_SPEC_BYTES + "\n", "bytes"),
    ],
    ids=["yaml-100k-deep", "json-100k-deep", "json-too-deep", "too-big"],
)
def test_spec_nesting_and_size_are_bounded(server, text, needle):
    with MixerClient(server.address, timeout=60) as c:
        before = [j.name for j in c.list_jobs()]
        with pytest.raises(grpc.RpcError) as err:
            c.create_job(text)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert needle in err.value.details()
        assert [j.name for j in c.list_jobs()] == before


def test_stored_spec_size_is_bounded():
    # Short to send, long to store: many domains from a compact data_path.
    n = MAX_SPEC_BYTES // 40
    text = json.dumps({"name": "wide", "data_path": " ".join(f"/data/prefix_{i}" for i in range(n))})
    assert len(text) < MAX_SPEC_BYTES
    with pytest.raises(SpecError) as err:
        JobSpec.from_yaml(text)
    assert err.value.field == "spec" and "stored" in str(err.value)


# -- 4. finite but extreme values ------------------------------------------------------------------

EXTREME_REPORTS = [
    # (field the refusal names, per-domain arrays of the report)
    ("domain_loss_sum", {"domain_loss_sum": [1e308, 1.0, 1.0], "domain_token_count": [1e-10, 1.0, 1.0]}),
    (
        "domain_loss_sum",
        {"domain_loss_sum": [MAX_LOSS * 10 * 1.5, 1.0, 1.0], "domain_token_count": [10.0, 1.0, 1.0]},
    ),
    (
        "domain_token_count",
        {"domain_loss_sum": [1.0, 1.0, 1.0], "domain_token_count": [MAX_TOKENS * 2, 1.0, 1.0]},
    ),
    ("excess_loss_sum", {"excess_loss_sum": [1e300, 0.0, 0.0], "domain_token_count": [1.0, 1.0, 1.0]}),
    ("domain_sample_count", {"domain_sample_count": [INT64_MAX, INT64_MAX, 3]}),
    ("domain_sample_count", {"domain_sample_count": [MAX_REPORT_SAMPLES, 1, 0]}),
    ("val_loss", {"val_loss": [1e300, 1.0, 1.0]}),
    ("alignment", {"alignment": [-1e300, 0.0, 0.0]}),
    ("extra", {"extra": {"lr": float("nan")}}),
    ("extra", {"extra": {"lr": float("inf")}}),
]


@pytest.mark.parametrize(
    ("field", "arrays"), EXTREME_REPORTS, ids=[f"{f}-{i}" for i, (f, _) in enumerate(EXTREME_REPORTS)]
)
def test_extreme_report_values_are_refused_naming_the_field(server, field, arrays):
    with MixerClient(server.address) as c:
        c.create_job(job_spec("ext"))
        c.report("ext", loss_report(0))
        msg = pb.Signals(step=1, source="w")
        for name, values in arrays.items():
            if name == "extra":
                for k, v in values.items():
                    msg.extra[k] = v
            else:
                getattr(msg, name).extend(values)
        before, weights = log_rows(server.db, "ext"), c.get_weights("ext")
        refused(c, "ext", msg, field)
        assert log_rows(server.db, "ext") == before
        assert c.get_weights("ext") == weights
        after = c.report("ext", loss_report(1))
        assert np.isfinite(after.latest.weights).all()


def test_reports_at_the_bounds_are_accepted(server):
    with MixerClient(server.address) as c:
        c.create_job(job_spec("edge"))
        edge = pb.Signals(
            step=0,
            source="w",
            domain_token_count=[MAX_TOKENS, 1e-300, 0.0],
            domain_loss_sum=[MAX_LOSS * MAX_TOKENS, MAX_LOSS * 1e-300, 0.0],
            domain_sample_count=[MAX_REPORT_SAMPLES - 2, 1, 1],
            val_loss=[MAX_LOSS, -MAX_LOSS, float("nan")],
        )
        resp = c.report("edge", edge)
        assert np.isfinite(resp.latest.weights).all()
        assert log_rows(server.db, "edge")[0][4] == MAX_REPORT_SAMPLES


# Parameters that make each strategy act within a short stream.
FAST: dict[str, dict] = {
    "ado": {"warmup_steps": 2, "refit_every": 4, "max_points": 8},
    "aioli": {"lp_rounds": 1, "lp_steps": 1, "update_steps": 4},
    "dga": {"ema": 0.0},
    "toremi": {"switch_step": 2, "num_topics": 4},
    "dwm": {"stage_steps": 2, "learn_steps": 1},
    "odm": {"variant": "reference"},
    "agent": {"model": fresh_model(["a", "b", "c"])},
}
STRATEGY_PARAMS = [pytest.param(name, FAST.get(name, {}), id=name) for name in sorted(REGISTRY)] + [
    pytest.param("odm", {"variant": "exp3"}, id="odm-exp3"),
    pytest.param("odm", {"variant": "paper", "reward_scale": 1e3}, id="odm-paper-scaled"),
    pytest.param("doremi", {"eta": 1e3, "c": 0.0}, id="doremi-steep"),
]
TOKEN_EDGES = [0.0, 5e-324, 1e-300, 1.0, MAX_TOKENS]
MEAN_EDGES = [0.0, 1e-300, 1.0, 700.0, MAX_LOSS]
VALUE_EDGES = [-MAX_LOSS, -1.0, 0.0, 1e-300, 1.0, MAX_LOSS]
SAMPLE_EDGES = [0.0, 1.0, float(np.finfo(np.float32).max)]


@st.composite
def edge_reports(draw: st.DrawFn, step: int, k: int) -> Report:
    """A report whose values are drawn from the edges of each field's range."""
    r = Report(step=step, source="w")
    if draw(st.booleans()):
        tokens = np.array(draw(st.lists(st.sampled_from(TOKEN_EDGES), min_size=k, max_size=k)))
        r.domain_token_count = tokens
        r.domain_loss_sum = tokens * np.array(
            draw(st.lists(st.sampled_from(MEAN_EDGES), min_size=k, max_size=k))
        )
        r.excess_loss_sum = tokens * np.array(
            draw(st.lists(st.sampled_from(MEAN_EDGES), min_size=k, max_size=k))
        )
        r.domain_sample_count = np.array(
            draw(st.lists(st.sampled_from([0, 1, MAX_REPORT_SAMPLES // k]), min_size=k, max_size=k))
        )
    if draw(st.booleans()):
        r.val_loss = np.array(
            draw(st.lists(st.sampled_from([*VALUE_EDGES, float("nan")]), min_size=k, max_size=k))
        )
    if draw(st.booleans()):
        r.alignment = np.array(draw(st.lists(st.sampled_from(VALUE_EDGES), min_size=k, max_size=k)))
    if draw(st.booleans()):
        n = draw(st.integers(1, 6))
        r.sample_loss = np.array(
            draw(st.lists(st.sampled_from(SAMPLE_EDGES), min_size=n, max_size=n)), dtype=np.float32
        )
        r.sample_domain = np.array(
            draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n)), dtype=np.int32
        )
        r.sample_topic = np.array(draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)), dtype=np.int32)
        r.sample_align = np.array(
            draw(st.lists(st.sampled_from([-1e30, 0.0, 1e30]), min_size=n, max_size=n)), dtype=np.float32
        )
    return r


def _no_infinity(value) -> bool:
    if isinstance(value, np.ndarray):
        return value.dtype.kind not in "fc" or not np.isinf(value).any()
    if isinstance(value, float):
        return not np.isinf(value)
    if isinstance(value, dict):
        return all(_no_infinity(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_no_infinity(v) for v in value)
    return True


@pytest.mark.parametrize(("strategy", "params"), STRATEGY_PARAMS)
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(data=st.data())
def test_no_accepted_value_makes_a_strategy_state_non_finite(strategy, params, data):
    spec = JobSpec.from_dict(
        {
            "name": "p",
            "domains": ["a", "b", "c"],
            "strategy": {"name": strategy, "params": params},
            "cadence": {"update_every": 1},
        }
    )
    engine = Engine(spec)
    for step in range(data.draw(st.integers(3, 10))):
        report = data.draw(edge_reports(step, spec.num_domains))
        try:
            report = validate_report(report, spec.num_domains)
        except SignalError:
            continue  # outside the ranges: refused at the gate
        before = engine.snapshot()
        try:
            version = engine.ingest(report, step)
        except SignalError as e:
            assert engine.snapshot() == before, f"a refused report changed the engine ({e})"
            continue
        assert _no_infinity(engine.state), f"step {step}: the {strategy} state holds an infinity"
        if version is not None:
            assert np.isfinite(version.weights).all() and abs(version.weights.sum() - 1.0) < 1e-9
            assert _no_infinity(version.params)


# -- 5. smaller: statuses, names, echoes, the HTTP API ---------------------------------------------

WRONG_TYPES = [
    (
        "cadence.prior_smoothing",
        {"name": "wt", "domains": ["a", "b"], "cadence": {"prior_smoothing": "half"}},
    ),
    ("name", {"name": "trailing\n", "domains": ["a", "b"]}),
    ("name", {"name": "x" * 129, "domains": ["a", "b"]}),
]


@pytest.mark.parametrize(
    ("field", "data"), WRONG_TYPES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(WRONG_TYPES)]
)
def test_spec_of_the_wrong_shape_is_invalid_argument_naming_the_field(server, field, data):
    with MixerClient(server.address) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.create_job(data)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert f"{field}:" in err.value.details()
        assert c.list_jobs() == []


def test_very_long_names_echoed_in_errors_are_cut(server):
    from mixer.server.runtime import MAX_MESSAGE

    name = "n" * 200_000
    with MixerClient(server.address) as c:
        for call in (
            lambda: c.get_job(name),
            lambda: c.get_weights(name),
            lambda: c.report(name, loss_report(0)),
        ):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.NOT_FOUND, err.value.details()
            assert "'nnnn" in err.value.details() and len(err.value.details()) <= MAX_MESSAGE


@pytest.mark.parametrize("version", [str(1 << 63), str(1 << 70), "9" * 5000])
def test_http_version_number_out_of_range_is_a_400(server, version):
    import urllib.error
    import urllib.request

    with MixerClient(server.address) as c:
        c.create_job(job_spec("h"))
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(
            f"http://127.0.0.1:{server.http_port}/api/jobs/h/versions/{version}", timeout=10
        )
    assert err.value.code == 400
    assert "version" in json.loads(err.value.read())["error"]


@pytest.mark.parametrize("count", [1, 255, 256, 257, 700])
def test_a_commit_of_any_size_stores_every_row_in_order(db_url, count):
    """The hot inserts go out as one multi-row statement per 256 rows, one text per row count:
    every signal and version of a commit of any size is stored, in order, values intact."""
    store = Store(db_url)
    try:
        rec, _ = store.create_job(f"many-{count}", "{}", "f", "static")
        signals = [
            LogEntry(seq=i, step=i, source=f"w{i % 3}", source_seq=i % 2, applied_version=i - 1, num_samples=i % 7,
                     payload=pb.Signals(step=i).SerializeToString())
            for i in range(count)
        ]
        versions = [_version(i, 2 * i) for i in range(count // 2 + 1)]
        store.append([Append(rec.id, signals=signals, versions=versions)])
        got = list(store.signals(rec.id))
        assert [(s.seq, s.step, s.source, s.source_seq, s.applied_version, s.num_samples) for s in got] == [
            (r.seq, r.step, r.source, r.source_seq, r.applied_version, r.num_samples) for r in signals
        ]
        assert [bytes(s.payload) for s in got] == [r.payload for r in signals]
        assert [(v.version, v.effective_step) for v, _ in store.versions(rec.id)] == [(v.version, v.effective_step) for v in versions]
    finally:
        store.close()


@pytest.mark.parametrize(
    "bad",
    [
        {"signal": {"step": INT64_MAX + 1}},
        {"signal": {"source_seq": -(1 << 63) - 1}},
        {"signal": {"num_samples": 1 << 31}},
        {"version": {"effective_step": INT64_MAX + 1}},
        {"version": {"log_seq": -(1 << 63) - 1}},
    ],
)
def test_an_integer_out_of_its_column_is_refused_by_name_and_nothing_is_written(db_url, bad):
    """The store's last line: a row whose integer does not fit its column fails the commit before
    any SQL, with a RowOutOfRange naming the table, column, value and job; nothing is written."""
    from mixer.store.repository import RowOutOfRange

    store = Store(db_url)
    try:
        rec, _ = store.create_job("rows", "{}", "f", "static")
        fields = {"seq": 0, "step": 0, "source": "w", "source_seq": 0, "applied_version": -1, "num_samples": 1, "payload": b""}
        signals = [LogEntry(**fields), LogEntry(**{**fields, "seq": 1, **bad.get("signal", {})})]
        v = bad.get("version", {})
        versions = [Version(0, v.get("effective_step", 0), np.full(K, 1.0 / K), trigger_step=0, log_seq=v.get("log_seq", -1))]
        with pytest.raises(RowOutOfRange) as err:
            store.append([Append(rec.id, signals=signals, versions=versions)])
        table, (column, value) = ("signals", *bad["signal"].items()) if "signal" in bad else ("versions", *bad["version"].items())
        assert f"{table}.{column} = {value} of job id {rec.id}" in str(err.value)
        assert list(store.signals(rec.id)) == [] and store.versions(rec.id) == []
    finally:
        store.close()
