"""Isolation between jobs on one real server: a job's costly strategy update runs off the event
loop, re-sent reports are answered without a database read on it, and GetWeights (newest, at a
step, by number) is answered from the versions kept in memory, also after a restart."""

from __future__ import annotations

import statistics
import threading
import time
import urllib.request

import numpy as np
import pytest

from mixer.bench.isolation import HEAVY_SPEC_PARAMS, _heavy_reports
from mixer.client import MixerClient
from mixer.replay import verify
from mixer.reporter import Reporter
from mixer.server.runtime import VERSIONS_KEPT
from mixer.store import Store
from mixer.types import ReportAck, ServedVersion
from mixer.v1 import mixer_pb2 as pb

HEAVY_K = 64
HEAVY_UPDATES = 6


def _metric(srv, name: str, labels: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{srv.http_port}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(f"{name}{{{labels}}} "):
            return float(line.split()[-1])
    raise AssertionError(f"no series {name}{{{labels}}} in /metrics")


def _signals(step: int, source: str = "w", k: int = 2) -> pb.Signals:
    return pb.Signals(
        step=step, source=source, domain_loss_sum=[1.0 + 0.1 * (step % 7)] * k, domain_token_count=[16.0] * k
    )


def test_a_costly_update_does_not_hold_up_another_jobs_acks(server):
    """ADO at K=64 refitting at every step (its spec makes each update cost hundreds of ms) next to
    an ordinary job: the ordinary job's reports are acknowledged while the costly update runs, in a
    small fraction of the time one costly update takes (its own acknowledgement)."""
    c = MixerClient(server.address, timeout=60)
    c.create_job(
        {
            "name": "heavy",
            "domains": [f"d{i}" for i in range(HEAVY_K)],
            "strategy": {"name": "ado", "params": HEAVY_SPEC_PARAMS},
            "cadence": {"update_every": 1},
        }
    )
    c.create_job({"name": "light", "domains": ["a", "b"], "strategy": "odm", "cadence": {"update_every": 1}})
    reports = _heavy_reports(HEAVY_K, 2 + HEAVY_UPDATES, "heavy")
    for r in reports[:2]:  # the first fits (through one point, then two) are cheap
        c.report("heavy", r)
    heavy_ms: list[float] = []
    running = threading.Event()

    def heavy() -> None:
        rep = Reporter(server.address, "heavy", "heavy", max_buffer=4).start()
        rep.connected.wait(30)
        running.set()
        for r in reports[2:]:
            t = time.perf_counter()
            rep.submit(r)
            assert rep.wait_pending(0, timeout=120)
            heavy_ms.append((time.perf_counter() - t) * 1000)
        rep.close()

    th = threading.Thread(target=heavy)
    th.start()
    running.wait(30)
    light_ms: list[float] = []
    step = 0
    while th.is_alive():
        t = time.perf_counter()
        ack = c.report("light", _signals(step))
        light_ms.append((time.perf_counter() - t) * 1000)
        assert ack.step == step and not ack.duplicate
        step += 1
    th.join()
    assert len(heavy_ms) == HEAVY_UPDATES
    assert c.get_job("heavy").latest_version == 2 + HEAVY_UPDATES  # every report made a version
    heavy_median, light_median = statistics.median(heavy_ms), statistics.median(light_ms)
    # While one costly update runs, the other job gets several acknowledgements through (on the
    # event loop it would wait for the whole update: one at most, at least as slow as the update).
    assert len(light_ms) >= 3 * HEAVY_UPDATES, (len(light_ms), heavy_ms)
    assert light_median * 5 < heavy_median, (light_median, heavy_median)
    assert (
        _metric(server, "mixer_strategy_update_duration_seconds_count", 'strategy="ado"') == 2 + HEAVY_UPDATES
    )
    c.close()
    # The costly updates ran in an update process, and a replay in this process (from scratch,
    # the same strategy) re-derives every stored version bit for bit.
    assert "its updates run in an update process" in server.log()
    store = Store(server.db)
    try:
        result = verify(store, "heavy")
    finally:
        store.close()
    assert result.ok, result.to_dict()
    assert result.versions_checked == 3 + HEAVY_UPDATES and result.reports == 2 + HEAVY_UPDATES


def _resend(c: MixerClient, job: str, steps: range) -> list[ReportAck]:
    return [c.report(job, _signals(s)) for s in steps]


def test_resent_reports_are_answered_from_memory_then_after_a_restart_off_the_loop(
    server_factory, sqlite_url
):
    """Re-sent reports get their original log positions: from the source's recent keys in memory
    (no database read at all), and after a restart whose snapshot covers them, from the database
    in a lane (counted apart); a key below the mark that was never logged is refused either way."""
    srv = server_factory(sqlite_url)
    c = MixerClient(srv.address, timeout=30)
    # Every report but the first makes a version, snapshotted: after a restart nothing is
    # replayed, so no key is in memory.
    c.create_job(
        {
            "name": "r",
            "domains": ["a", "b"],
            "strategy": "odm",
            "cadence": {"update_every": 2, "snapshot_every": 1},
        }
    )
    steps = range(0, 60, 2)  # odd steps are never reported
    first = _resend(c, "r", steps)
    assert [a.duplicate for a in first] == [False] * len(steps)
    again = _resend(c, "r", steps)
    assert [(a.duplicate, a.log_seq) for a in again] == [(True, a.log_seq) for a in first]
    assert _metric(srv, "mixer_duplicate_lookups_total", 'where="memory"') == len(steps)
    assert _metric(srv, "mixer_duplicate_lookups_total", 'where="database"') == 0
    with pytest.raises(Exception, match="out of order"):
        c.report("r", _signals(steps[3] + 1))

    c.close()
    srv.terminate()
    srv.start()
    c = MixerClient(srv.address, timeout=30)
    rep = Reporter(srv.address, "r", "w", max_buffer=len(steps) + 1).start()
    for s in steps:  # a reconnecting worker re-sends its buffer: one batch, one query
        rep.submit(_signals(s))
    assert rep.close(60)
    assert rep.duplicates == len(steps) and not rep.rejected
    assert _metric(srv, "mixer_duplicate_lookups_total", 'where="database"') == len(steps)
    after = _resend(c, "r", steps)  # now in no batch of their own, still from the database
    assert [(a.duplicate, a.log_seq) for a in after] == [(True, a.log_seq) for a in first]
    with pytest.raises(Exception, match="out of order"):
        c.report("r", _signals(steps[3] + 1))
    c.close()


def _expected_at(versions: list[ServedVersion], step: int) -> ServedVersion:
    """The newest version whose effective step is at or before `step` (from the listed data)."""
    return [v for v in versions if v.effective_step <= step][-1]


def test_get_weights_at_a_step_and_by_number_from_memory_and_after_restart(server_factory, sqlite_url):
    """More versions than are kept in memory: every step and every version number answers what
    the stored list says, before and after a restart (older ones come from the database)."""
    srv = server_factory(sqlite_url)
    c = MixerClient(srv.address, timeout=30)
    c.create_job(
        {
            "name": "g",
            "domains": ["a", "b", "c"],
            "strategy": "odm",
            "cadence": {"update_every": 1, "delay": 2},
        }
    )
    rep = Reporter(srv.address, "g", "w", max_buffer=4096).start()
    n = VERSIONS_KEPT + 64
    rng = np.random.default_rng(0)
    for s in range(n):
        rep.submit(
            pb.Signals(
                step=s,
                source="w",
                domain_loss_sum=rng.uniform(1, 3, 3).tolist(),
                domain_token_count=[8.0] * 3,
            )
        )
    assert rep.flush(120)
    rep.close()

    def check() -> None:
        listed = c.list_versions("g")
        assert len(listed) == n + 1 and [v.version for v in listed] == list(range(n + 1))
        newest = c.get_weights("g")
        assert newest.version == listed[-1].version and newest.weights.tolist() == listed[-1].weights.tolist()
        for step in [*range(40), *range(n - 40, n + 5)]:
            got, want = c.get_weights("g", step=step), _expected_at(listed, step)
            assert (got.version, got.weights.tolist()) == (want.version, want.weights.tolist()), step
        for number in [0, 1, n // 2, n - VERSIONS_KEPT, n - 1, n]:
            got = c.get_weights("g", version=number)
            assert got.version == number and got.weights.tolist() == listed[number].weights.tolist()
        with pytest.raises(Exception, match="no version"):
            c.get_weights("g", version=n + 1)

    check()
    c.close()
    srv.terminate()
    srv.start()
    c = MixerClient(srv.address, timeout=30)
    check()
    c.close()



CHEAP_CASES = [  # strategy, whether its updates may run on the event loop
    ("odm", True),
    ("doremi", True),
    ("static", True),
    ("ado", False),
    ("aioli", False),
]


@pytest.mark.parametrize(("strategy", "on_loop"), CHEAP_CASES)
def test_which_strategies_update_on_the_loop(strategy, on_loop):
    from mixer.engine import Engine
    from mixer.server.offload import OffloadedStrategy, UpdateProcesses
    from mixer.spec import JobSpec

    spec = JobSpec.from_dict({"name": "j", "domains": ["a", "b", "c"], "strategy": strategy})
    off = OffloadedStrategy(Engine(spec).strategy, 1, spec.fingerprint(), spec.to_json(), UpdateProcesses())
    assert off.on_loop is on_loop


def test_a_cheap_update_that_took_long_sends_the_later_ones_to_the_lane_with_the_same_result(monkeypatch):
    """ODM updates on the calling thread; once LOOP_UPDATE_STRIKES in a row took over LOOP_UPDATE_S
    (a shorter run of slow ones does not count) the job's later updates go to its lane (on_loop
    off), and the versions are those of a plain engine, bit for bit."""
    from mixer import engine as engine_mod
    from mixer.server import offload
    from mixer.signals import Report, validate_report
    from mixer.spec import JobSpec

    spec = JobSpec.from_dict({"name": "j", "domains": ["a", "b"], "strategy": "odm", "cadence": {"update_every": 1}})
    plain, wrapped = engine_mod.Engine(spec), engine_mod.Engine(spec)
    off = wrapped.strategy = offload.OffloadedStrategy(
        wrapped.strategy, 1, spec.fingerprint(), spec.to_json(), offload.UpdateProcesses()
    )
    fast, slow, strikes = offload.LOOP_UPDATE_S, -1.0, offload.LOOP_UPDATE_STRIKES
    budgets = [fast, *[slow] * (strikes - 1), fast, *[slow] * strikes, fast]
    expect_on_loop = [True] * (2 * strikes) + [False, False]
    for step, (budget, on_loop) in enumerate(zip(budgets, expect_on_loop, strict=True)):
        monkeypatch.setattr(offload, "LOOP_UPDATE_S", budget)
        loss = np.array([1.0 + 0.1 * step, 2.0])
        r = validate_report(Report(step=step, source="w", domain_loss_sum=loss, domain_token_count=np.array([16.0, 16.0])), 2)
        a, b = plain.ingest(r, step), wrapped.ingest(r, step)
        assert off.on_loop is on_loop and not off.in_process
        assert a.version == b.version and np.array_equal(a.weights, b.weights)
