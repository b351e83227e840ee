"""Two sources on one session whose reports share (step, seq): a worker's training reports and its
"/val" validation reports go through one Reporter (as MixerWorker sends them). An Ack names
(step, seq) only; each report must still be acknowledged once, and the Reporter must drain."""

from __future__ import annotations

import numpy as np

from mixer.client import MixerClient, Reporter
from mixer.signals import Report
from mixer.store import Store

SPEC = {"name": "shared", "domains": ["a", "b"], "strategy": "odm"}


def test_reports_of_two_sources_with_the_same_keys_all_drain(server):
    with MixerClient(server.address) as c:
        c.create_job(SPEC)
    steps = range(1, 21)
    rep = Reporter(server.address, "shared", "w").start()
    assert rep.connected.wait(10)
    for t in steps:  # back to back, so that pairs with one key ride in one batch and one AckBatch
        rep.submit(
            Report(
                step=t,
                source="w",
                domain_loss_sum=np.array([1.0, 2.0]),
                domain_token_count=np.array([1.0, 1.0]),
            )
        )
        rep.submit(Report(step=t, source="w/val", val_loss=np.array([1.5, 2.5])))
    assert rep.close(timeout=20), (
        f"{rep.pending} reports never left the buffer though the service acknowledged {rep.acked}"
    )
    assert rep.acked == 2 * len(steps) and not rep.rejected

    store = Store(server.db, migrate=False)
    logged = sorted((s.source, s.step) for s in store.signals(store.get_job("shared").id))
    store.close()
    assert logged == sorted((src, t) for t in steps for src in ("w", "w/val"))
