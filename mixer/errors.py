"""The error a job spec, a strategy's parameters or a weighting's parameters raise when invalid.

It lives apart from `mixer.spec` so that the strategies and weightings, which `JobSpec.validate`
calls to check their parameters, can raise it without importing the spec module back.
"""

from __future__ import annotations


class SpecError(ValueError):
    """A job spec is invalid; the message names the field."""

    def __init__(self, field_name: str, message: str):
        self.field = field_name
        super().__init__(f"{field_name}: {message}")
