"""A real `mixer serve` with a job that streams while a test watches it, and the outside binaries."""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from mixer.bench.launch import ServerProcess
from mixer.client import MixerClient
from mixer.engine import Version
from mixer.reporter import Reporter
from mixer.signals import Report
from mixer.spec import JobSpec
from mixer.store import Append, Store

REPO = Path(__file__).resolve().parents[2]
DOMAINS = ["web", "code", "math", "books"]
JOB = "watched-run"
SPEC = {"name": JOB, "domains": DOMAINS, "strategy": "odm", "cadence": {"update_every": 10}}


def binary(path: str, package: str) -> str:
    """An outside program the test needs; fail (never skip) with what to install."""
    found = shutil.which(path) or (path if Path(path).exists() else None)
    if found is None:
        pytest.fail(f"{path} not found: install the Debian package '{package}' (apt-get install -y {package}); .ci/run does", pytrace=False)
    return found


def make_report(step: int, applied: int, rng: np.random.Generator) -> Report:
    """Per-domain losses that fall with the step at different rates, so the strategy keeps moving."""
    base = np.array([2.6, 1.4, 1.9, 3.1])
    loss = base * (1.0 + 1.5 * np.exp(-step / np.array([120.0, 60.0, 300.0, 200.0]))) * rng.uniform(0.97, 1.03, 4)
    samples = rng.multinomial(32, [0.4, 0.3, 0.1, 0.2])
    tokens = samples * 512.0
    return Report(step=step, source="rank0", applied_version=applied, domain_loss_sum=loss * tokens,
                  domain_token_count=tokens, domain_sample_count=samples)


def store_derived(db: str, name: str, source: str, domains: list[str], n: int = 4) -> list[Version]:
    """What `mixer replay --as NAME` stores: a job with `source_job` set and versions (with topic
    weights), but no log of its own. Written straight into the database, as replay does."""
    store = Store(db)
    spec = JobSpec.from_dict({"name": name, "domains": domains, "strategy": "static"})
    rec, _ = store.create_job(spec.name, spec.to_json(), spec.fingerprint(), spec.strategy.name, source_job=source)
    topics = np.linspace(0.1, 2.0, 50)[::-1].copy()
    base = np.linspace(2.0, 1.0, len(domains))
    versions = [Version(version=i, effective_step=7 * i, weights=np.roll(base / base.sum(), i),
                        params={"topic_weights": np.roll(topics, i).tolist(), "temperature": 2.0}) for i in range(n)]
    store.append([Append(rec.id, versions=versions)])
    store.close()
    return versions


@dataclass
class Stream:
    """A job streaming reports over a Reporter session from a background thread."""

    server: ServerProcess
    job: str = JOB
    domains: list[str] = field(default_factory=lambda: list(DOMAINS))
    interval: float = 0.05
    step: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        rng = np.random.default_rng(0)
        rep = Reporter(self.server.address, self.job, "rank0", max_backoff=0.5).start()
        applied = -1
        try:
            while not self._stop.is_set():
                v = rep.poll()
                if v is not None:  # a real worker applies a version at its first step boundary after arrival
                    applied = v.version
                rep.submit(make_report(self.step, applied, rng))
                self.step += 1
                self._stop.wait(self.interval)
        finally:
            rep.close(timeout=10)

    def wait_steps(self, n: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.step < n:
            assert time.monotonic() < deadline, f"the stream made only {self.step} of {n} steps in {timeout}s"
            time.sleep(0.05)


@pytest.fixture
def stream(server_factory, sqlite_url):
    srv = server_factory(sqlite_url)
    with MixerClient(srv.address) as c:
        c.create_job(SPEC)
    s = Stream(srv)
    t = threading.Thread(target=s.run, name="test-stream", daemon=True)
    t.start()
    yield s
    s._stop.set()
    t.join(20)
