"""The training loop's attachment to a mixer service: a background session (client.Reporter)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mixer.client import Reporter
from mixer.signals import Report


class ServiceAttachment:
    """Implements train.Attachment over a session; never blocks the training step.

    If the service is unreachable, poll() returns nothing new (training continues on the last
    weights) and reports wait in the reporter's buffer (then its spill file) until it returns.
    """

    def __init__(self, address: str, job: str, source: str = "rank0", **reporter_kwargs):
        self.reporter = Reporter(address, job, source, **reporter_kwargs).start()
        self.source = source

    def poll(self) -> tuple[int, Sequence[float], int] | None:
        v = self.reporter.poll()
        return None if v is None else (v.version, v.weights, v.effective_step)

    def report(
        self,
        *,
        step: int,
        applied_version: int,
        domain_loss_sum: np.ndarray,
        domain_token_count: np.ndarray,
        domain_sample_count: np.ndarray,
        sample_loss: np.ndarray,
        sample_domain: np.ndarray,
        sample_id: np.ndarray,
    ) -> None:
        self.reporter.submit(
            Report(
                step=step,
                source=self.source,
                applied_version=applied_version,
                domain_loss_sum=domain_loss_sum,
                domain_token_count=domain_token_count,
                domain_sample_count=domain_sample_count,
                sample_loss=sample_loss,
                sample_domain=sample_domain,
                sample_id=sample_id,
            )
        )

    def report_validation(self, step: int, domain_loss: np.ndarray) -> None:
        # Validation goes out under its own source: the training reports of a step arrive one
        # step late (asynchronous host copy), and each source's keys must increase.
        self.reporter.submit(Report(step=step, source=f"{self.source}/val", val_loss=np.asarray(domain_loss, dtype=np.float64)))

    def close(self, timeout: float = 60.0) -> bool:
        return self.reporter.close(timeout)
