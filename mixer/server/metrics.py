"""Prometheus metrics: process-wide counters and histograms, and per-job series from live state.

Per-job and per-domain series come from a custom collector over the live runtimes, so a job
that is no longer loaded leaves no stale series. Never a label per sample or per topic.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

REJECT_REASONS = ("invalid", "stale", "ahead", "out_of_order", "finished", "derived")
"""Every reason a report is refused for (`mixer_rejected_reports_total{reason}`): a value the
checks refuse, a step more than `cadence.max_step_lag` behind or `cadence.max_step_ahead` ahead,
a source's key below its last that is not in the log, a finished job, a derived (replayed) job.
Each series exists at 0 from the start, so a healthy server shows 0 rather than no data."""

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """The server's metrics, on a registry of its own."""

    def __init__(self, runtimes_getter):
        self.registry = CollectorRegistry()
        self.rpc_seconds = Histogram(
            "mixer_rpc_duration_seconds", "gRPC handling time per method", ["method"], buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.update_seconds = Histogram(
            "mixer_strategy_update_duration_seconds", "Time of one strategy update", ["strategy"], buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.commit_seconds = Histogram(
            "mixer_db_commit_duration_seconds", "Time of one group commit", buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.commit_batch = Histogram(
            "mixer_db_commit_batch_size", "Appends per group commit", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=self.registry
        )
        self.ingest_seconds = Histogram(
            "mixer_ingest_lag_seconds", "From a report's (or a batch's) arrival to its acknowledgement (durable)", buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.push_seconds = Histogram(
            "mixer_version_push_lag_seconds", "From a version's commit to its push to a session", buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.duplicate_lookups_total = Counter(
            "mixer_duplicate_lookups_total",
            "Re-sent reports below their source's mark, by where their log position was found: "
            "memory (the source's recent keys) or database (an older one, read off the event loop)",
            ["where"],
            registry=self.registry,
        )
        for where in ("memory", "database"):
            self.duplicate_lookups_total.labels(where)
        self.rejected_total = Counter("mixer_rejected_reports_total", "Reports refused, by reason", ["reason"], registry=self.registry)
        for reason in REJECT_REASONS:
            self.rejected_total.labels(reason)
        self.registry.register(JobCollector(runtimes_getter))
        self._update_children: dict[str, Histogram] = {}

    def observe_update(self, strategy: str, seconds: float) -> None:
        child = self._update_children.get(strategy)
        if child is None:  # labels() looks the child up under a lock: once per strategy here
            child = self._update_children[strategy] = self.update_seconds.labels(strategy)
        child.observe(seconds)

    def observe_commit(self, seconds: float, batch: int) -> None:
        self.commit_seconds.observe(seconds)
        self.commit_batch.observe(batch)

    def duplicate_lookup(self, where: str) -> None:
        self.duplicate_lookups_total.labels(where).inc()

    def rejected(self, reason: str) -> None:
        self.rejected_total.labels(reason).inc()


class JobCollector(Collector):
    """Per-job series read from the live runtimes at scrape time."""

    def __init__(self, runtimes_getter):
        self.runtimes_getter = runtimes_getter

    def collect(self):
        weight = GaugeMetricFamily("mixer_domain_weight", "Current weight of a domain (fraction of the unit)", labels=["job", "domain"])
        loss = GaugeMetricFamily("mixer_domain_loss", "Latest reported training loss per token of a domain", labels=["job", "domain"])
        version = GaugeMetricFamily("mixer_weight_version", "Newest weight version number", labels=["job"])
        eff = GaugeMetricFamily("mixer_weight_effective_step", "Effective step of the newest version", labels=["job"])
        step = GaugeMetricFamily("mixer_job_step", "Highest step reported", labels=["job"])
        lag = GaugeMetricFamily("mixer_applied_version_lag_steps", "Steps between a version's effective step and a worker applying it", labels=["job"])
        reports = CounterMetricFamily("mixer_reports", "Reports accepted into the log", labels=["job"])
        samples = CounterMetricFamily("mixer_samples", "Samples covered by accepted reports", labels=["job"])
        dups = CounterMetricFamily("mixer_duplicate_reports", "Re-sent reports dropped as duplicates", labels=["job"])
        versions = CounterMetricFamily("mixer_versions", "Weight versions created (the initial one included)", labels=["job"])
        info = GaugeMetricFamily("mixer_job_info", "1 for every live job, labelled with its strategy", labels=["job", "strategy"])
        starving = GaugeMetricFamily(
            "mixer_starving_domains",
            "1 while a domain has sat at its floor for cadence.starvation_versions consecutive versions, else 0 "
            "(only jobs whose spec sets cadence.starvation_versions)",
            labels=["job", "domain"],
        )
        for rt in list(self.runtimes_getter()):
            if rt.job.status == "finished":
                continue  # a finished job leaves no live series
            name = rt.job.name
            cur = rt.engine.current
            for d, w in zip(rt.spec.domain_names, cur.weights):
                weight.add_metric([name, d], float(w))
            if rt.last_loss is not None:
                for d, x in zip(rt.spec.domain_names, rt.last_loss):
                    loss.add_metric([name, d], float(x))
            version.add_metric([name], cur.version)
            eff.add_metric([name], cur.effective_step)
            step.add_metric([name], rt.engine.max_step)
            lag.add_metric([name], rt.applied_lag)
            reports.add_metric([name], rt.report_count)
            samples.add_metric([name], rt.sample_count)
            dups.add_metric([name], rt.duplicate_count)
            versions.add_metric([name], cur.version + 1)
            info.add_metric([name, rt.spec.strategy.name], 1.0)
            if rt.spec.cadence.starvation_versions is not None:
                flagged = set(cur.params.get("starving", ()))
                for i, d in enumerate(rt.spec.domain_names):
                    starving.add_metric([name, d], 1.0 if i in flagged else 0.0)
        yield from (weight, loss, version, eff, step, lag, reports, samples, dups, versions, info, starving)
