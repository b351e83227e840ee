"""ListJobs after a restart: a job no session or call has loaded yet shows its stored newest version,
newest step and report count, not -1 and 0 as if it had none."""

from __future__ import annotations

import numpy as np

from mixer.client import MixerClient
from mixer.signals import Report

SPEC = {"name": "listed", "domains": ["a", "b"], "strategy": "odm", "cadence": {"update_every": 2}}


def test_a_job_not_yet_loaded_lists_what_is_stored(server_factory, sqlite_url):
    first = server_factory(sqlite_url)
    with MixerClient(first.address) as c:
        c.create_job(SPEC)
        for step in range(7):
            c.report(
                "listed",
                Report(
                    step=step,
                    source="w",
                    domain_loss_sum=np.array([1.0, 2.0]),
                    domain_token_count=np.array([1.0, 1.0]),
                ),
            )
        before = c.get_job("listed")
    assert before.latest_version >= 1 and before.max_step == 6 and before.report_count == 7
    first.terminate()
    second = server_factory(sqlite_url)
    with MixerClient(second.address) as c:
        (listed,) = [j for j in c.list_jobs() if j.name == "listed"]
    assert (listed.latest_version, listed.max_step, listed.report_count) == (
        before.latest_version,
        before.max_step,
        before.report_count,
    )
