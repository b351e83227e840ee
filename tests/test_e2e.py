"""End to end: real server subprocess, two concurrent sessions, SIGKILL mid-stream, restart, replay."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from mixer.client import MixerClient
from mixer.replay import verify
from mixer.reporter import Reporter
from mixer.signals import Report
from mixer.store import Store

STEPS = 1000
DOMAINS = ["web", "code", "books", "math"]


def synthetic_report(step: int, source: str, rng: np.random.Generator) -> Report:
    # Domain losses fall at different rates; "math" stays high, so ODM should favour it.
    base = np.array([2.0, 2.5, 3.0, 4.0]) * (1.0 + 2.0 / (1.0 + step / 50.0))
    base[3] = 6.0
    counts = rng.multinomial(32, [0.25] * 4)
    tokens = counts * 128.0
    losses = rng.normal(base[np.repeat(np.arange(4), counts)], 0.1).clip(0.01).astype(np.float32)
    per_domain = np.zeros(4)
    np.add.at(per_domain, np.repeat(np.arange(4), counts), losses.astype(np.float64) * 128.0)
    return Report(
        step=step,
        source=source,
        domain_loss_sum=per_domain,
        domain_token_count=tokens,
        domain_sample_count=counts.astype(np.int64),
        sample_loss=losses,
        sample_domain=np.repeat(np.arange(4), counts).astype(np.int32),
        sample_id=(np.arange(32) + step * 1000).astype(np.int64),
    )


def stream(reporter: Reporter, source: str, seed: int, pace: float) -> None:
    rng = np.random.default_rng(seed)
    for step in range(STEPS):
        r = synthetic_report(step, source, rng)
        v = reporter.current
        r.applied_version = v.version if v else -1
        reporter.submit(r)
        time.sleep(pace)


@pytest.mark.slow
def test_two_sessions_survive_sigkill_and_replay_exactly(server_factory, db_url):
    srv = server_factory(db_url)
    spec = {
        "name": "e2e",
        "domains": [{"name": d} for d in DOMAINS],
        "strategy": {"name": "odm"},
        "cadence": {"update_every": 10, "snapshot_every": 7},
    }
    with MixerClient(srv.address) as c:
        c.create_job(spec)

    reporters = [Reporter(srv.address, "e2e", f"rank{i}", max_backoff=0.5).start() for i in range(2)]
    threads = [threading.Thread(target=stream, args=(r, f"rank{i}", i, 0.002)) for i, r in enumerate(reporters)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while reporters[0].acked < 300 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert reporters[0].acked >= 300, "the first session never got going"
    srv.kill()  # SIGKILL mid-stream: in-flight reports are not acknowledged and must be resent
    killed_at = [r.acked for r in reporters]
    time.sleep(0.5)
    srv.start()
    for t in threads:
        t.join(120)
    for r in reporters:
        assert r.close(timeout=120), f"{r.source}: {r.pending} reports never acknowledged"
        assert not r.rejected, r.rejected[:3]
    assert all(k < STEPS for k in killed_at), "the kill came after the stream had finished"

    store = Store(db_url)
    rec = store.get_job("e2e")
    keys = [(s.source, s.step, s.source_seq) for s in store.signals(rec.id)]
    # Every acknowledged report is in the log exactly once; none is missing.
    assert len(keys) == len(set(keys)) == 2 * STEPS
    assert sorted(keys) == sorted((f"rank{i}", s, 0) for i in range(2) for s in range(STEPS))
    seqs = [s.seq for s in store.signals(rec.id)]
    assert seqs == list(range(len(seqs))), "the log has gaps or disorder"

    versions = store.versions(rec.id)
    assert len(versions) > 50
    first, last = versions[0][0].weights, versions[-1][0].weights
    assert not np.allclose(first, last), "weights never moved"
    assert int(np.argmax(last)) == DOMAINS.index("math"), f"ODM should favour the high-loss domain: {last}"

    result = verify(store, "e2e")
    assert result.ok, result.first_divergence
    assert result.versions_checked == len(versions)
    assert result.reports == 2 * STEPS
    store.close()
