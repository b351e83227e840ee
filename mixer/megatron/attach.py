"""The training loop's attachment to a mixer service: a background session (reporter.Reporter)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from mixer.client import MixerClient
from mixer.megatron.versions import VersionUpdate
from mixer.reporter import Reporter
from mixer.signals import Report

log = logging.getLogger(__name__)


class StrictTimeoutError(TimeoutError):
    """A strict attachment waited longer than its timeout for the service."""


class ServiceAttachment:
    """Implements train.Attachment over a session; never blocks the training step (unless strict).

    If the service is unreachable, poll() returns nothing new (training continues on the last
    weights) and reports wait in the reporter's buffer (then its spill file) until it returns.

    strict=True makes two runs of the same job identical: before step t, poll_version(t) waits until every report handed over so far is
    acknowledged (so every version they trigger is committed), then asks the service for the version
    in force at step t. A resumed run therefore gets the recorded versions, step for step. It costs
    a round trip and a database commit per step, and the loop must hand over each step's report
    before the next step (TrainConfig.strict).
    """

    def __init__(
        self,
        address: str,
        job: str,
        source: str = "rank0",
        *,
        strict: bool = False,
        strict_timeout: float = 300.0,
        token: str | None = None,
        **reporter_kwargs: Any,
    ):
        self.reporter = Reporter(address, job, source, token=token, **reporter_kwargs).start()
        self.job = job
        self.source = source
        self.strict = strict
        self.strict_timeout = strict_timeout
        self._client = MixerClient(self.reporter.addresses[0], token=token) if strict else None
        self._last = -1

    def poll(self) -> tuple[int, Sequence[float], int] | None:
        v = self.reporter.poll()
        return None if v is None else (v.version, v.weights, v.effective_step)

    def poll_version(self, step: int) -> VersionUpdate | None:
        """A new version (with params and blob) before `step`, or None; waits only when strict."""
        if not self.strict:
            v = self.reporter.poll()
            return None if v is None else VersionUpdate.of(v)
        deadline = time.monotonic() + self.strict_timeout
        while not self.reporter.flush(timeout=min(10.0, max(0.1, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                raise StrictTimeoutError(
                    f"strict mode: reports for job {self.job!r} not acknowledged within {self.strict_timeout}s "
                    f"before step {step} (last error: {self.reporter.last_error or 'none'})"
                )
            log.warning("strict mode: waiting for the service to acknowledge reports before step %d", step)
        assert self._client is not None
        while True:
            try:
                v = self._client.get_weights(self.job, step=step)
                break
            except Exception as e:  # noqa: BLE001 - grpc errors: retry until the deadline
                if time.monotonic() >= deadline:
                    raise StrictTimeoutError(
                        f"strict mode: no version for step {step} of job {self.job!r}: {e}"
                    ) from None
                time.sleep(0.5)
        if v.version <= self._last:
            return None
        self._last = v.version
        return VersionUpdate.of(v)

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
        **signals: Any,
    ) -> None:
        """Queue one step's report; signals are further Report fields (excess_loss_sum, alignment, extra, ...)."""
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
                **signals,
            )
        )

    def report_validation(self, step: int, domain_loss: np.ndarray) -> None:
        # Validation goes out under its own source: the training reports of a step arrive one
        # step late (asynchronous host copy), and each source's keys must increase.
        self.reporter.submit(
            Report(step=step, source=f"{self.source}/val", val_loss=np.asarray(domain_loss, dtype=np.float64))
        )

    @property
    def pending(self) -> int:
        """Reports not yet acknowledged by the service."""
        return self.reporter.pending

    def close(self, timeout: float = 60.0) -> bool:
        if self._client is not None:
            self._client.close()
        return self.reporter.close(timeout)
