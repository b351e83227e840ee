"""Pure instance-level weighting: functions workers apply inside the training step.

The service owns and versions their parameters; workers evaluate them on each batch.
"""

from __future__ import annotations

from mixer.spec import JobSpec, SpecError

# name -> allowed parameter names; each method's module registers itself here.
METHODS: dict[str, frozenset[str]] = {"none": frozenset()}


def validate_weighting_spec(spec: JobSpec) -> None:
    name = spec.weighting.name
    if name not in METHODS:
        raise SpecError("weighting.name", f"unknown instance weighting {name!r}; available: {', '.join(sorted(METHODS))}")
    unknown = sorted(set(spec.weighting.params) - METHODS[name])
    if unknown:
        allowed = ", ".join(sorted(METHODS[name])) or "none"
        raise SpecError(f"weighting.params.{unknown[0]}", f"unknown parameter for {name!r}; allowed: {allowed}")
