"""log_owner: the job whose log a job consumes (itself, or a derived job's source), in a real database.

Replay, export and plots ask strictly (a missing source is an error naming it); the HTTP side's
loss chart asks leniently (the last job found, whose log is empty)."""

from __future__ import annotations

import re

import pytest

from mixer.replay import ReplayError, log_owner
from mixer.spec import JobSpec
from mixer.store import Append, LogEntry, Store
from mixer.v1 import mixer_pb2 as pb

CASES = [
    pytest.param({"rec": (None, 3), "d1": ("rec", 0), "d2": ("d1", 0)}, "d2", "rec", "rec", id="chain"),
    pytest.param({"rec": (None, 3), "d1": ("rec", 2)}, "d1", "d1", "d1", id="derived-with-a-log"),
    pytest.param({"rec": (None, 0)}, "rec", "rec", "rec", id="not-derived-empty"),
    pytest.param(
        {"d1": ("gone", 0)},
        "d1",
        ReplayError("derives from 'gone', whose log is not there"),
        "d1",
        id="source-missing",
    ),
    pytest.param(
        {"a": ("b", 0), "b": ("a", 0)},
        "a",
        ReplayError("derives from 'a', whose log is not there"),
        "b",
        id="cycle",
    ),
]
"""(jobs: name -> (source job, reports in its own log), the job asked about, the strict answer
(a job name, or the error with words its message must carry), the lenient answer)."""


def _store(url: str, jobs: dict[str, tuple[str | None, int]]) -> Store:
    store = Store(url)
    for name, (source, reports) in jobs.items():
        spec = JobSpec.from_yaml(f'{{"name": "{name}", "domains": ["a", "b"], "strategy": "odm"}}')
        rec, _ = store.create_job(name, spec.to_json(), spec.fingerprint(), spec.strategy.name, source)
        rows = [
            LogEntry(seq=i, step=i, source="w", source_seq=0, applied_version=0, num_samples=1, payload=pb.Signals(step=i).SerializeToString())
            for i in range(reports)
        ]
        if rows:
            store.append([Append(rec.id, signals=rows)])
    return store


@pytest.mark.parametrize(("jobs", "asked", "strict", "lenient"), CASES)
def test_log_owner(sqlite_url, jobs, asked, strict, lenient):
    store = _store(sqlite_url, jobs)
    try:
        rec = store.get_job(asked)
        assert log_owner(store, rec, strict=False).name == lenient
        if isinstance(strict, ReplayError):
            with pytest.raises(ReplayError, match=re.escape(str(strict))):
                log_owner(store, rec)
        else:
            assert log_owner(store, rec).name == strict
    finally:
        store.close()
