"""The defaults a stored spec's parameters resolve against, by `defaults_version`.

A spec is stored complete: `JobSpec.from_dict` writes every parameter of the strategy and the
instance weighting out, defaults included (`stamp`), and marks it `defaults_version: 2`, so that
a stored job replays the same whatever later releases choose as defaults. A stored spec without
that marker was written before parameters were written out (version 1): `JobSpec.from_json`
resolves its absent parameters to the defaults of that time (`LEGACY_DEFAULTS`: DoReMi's `mode`
online, DWM's `model` mlp-features) and keeps its stored text, so its fingerprint (and every
snapshot and sampler checkpoint that names it) stays the same.

Pure: no I/O. Today's defaults are the strategies' and weightings' own, found by method name.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from mixer.errors import SpecError

if TYPE_CHECKING:
    from mixer.spec import StrategySpec, WeightingSpec

__all__ = [
    "DEFAULTS_VERSION",
    "LEGACY_DEFAULTS",
    "LEGACY_DEFAULTS_VERSION",
    "check_defaults_version",
    "known_version",
    "stamp",
    "written_out",
]

DEFAULTS_VERSION = 2
"""The defaults a new spec's parameters are resolved against (written out in the stored form)."""
LEGACY_DEFAULTS_VERSION = 1
"""A spec stored before its parameters were written out (no `defaults_version` in it)."""
LEGACY_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "strategy": {"doremi": {"mode": "online"}},
    "weighting": {"dwm": {"model": "mlp-features"}},
}
"""Defaults of version 1 that differ from today's, by part and method name: before 2026-12-05
DoReMi had no `mode` (it sampled from alpha, today's `online`) and DWM's weighting model was the
per-sample MLP (today's `mlp-features`); see `git log -p mixer/strategies/doremi.py
mixer/weighting/params.py`. Every other default of that time is today's.

Version 1 covers the defaults just before version 2. One default changed earlier within it, and a
stored spec cannot say which side of that change it was written on: loss weighting's `r` was 1.0
until 2026-12-04 22:20 UTC and 0.4 after (the authors' released LinUpper configuration). A
version-1 spec with loss weighting and no `r` resolves to 0.4; a job stored before that change
ran with 1.0, and `mixer replay --verify` reports its replay as different rather than passing."""


def known_version(version: Any) -> bool:
    """Whether `version` is a defaults_version this release resolves (1 or 2; not a bool)."""
    return not isinstance(version, bool) and version in (LEGACY_DEFAULTS_VERSION, DEFAULTS_VERSION)


def check_defaults_version(version: Any) -> None:
    """SpecError naming `defaults_version` unless it is one this release resolves."""
    if not known_version(version):
        raise SpecError(
            "defaults_version",
            f"must be {LEGACY_DEFAULTS_VERSION} (stored before parameters were written out) or "
            f"{DEFAULTS_VERSION} (today's defaults; leave it out in a new spec), got {version!r}",
        )


def written_out(part: str, name: str, given: dict[str, Any], version: int) -> dict[str, Any] | None:
    """Every parameter of the method `name` of `part` ("strategy" or "weighting"), the absent ones
    at the defaults of `version`; None for an unknown method (left for validation to name)."""
    # Imported here: the strategies and weightings import mixer.spec for the spec type.
    if part == "strategy":
        from mixer.strategies import REGISTRY

        cls = REGISTRY.get(name)
        resolve = cls.resolve_params if cls is not None else None
    elif part == "weighting":
        from mixer.weighting import PARSERS

        parse = PARSERS.get(name)
        resolve = (lambda params: parse(params).to_dict()) if parse is not None else None
    else:
        raise ValueError(f"part must be strategy or weighting, got {part!r}")
    if resolve is None:
        return None
    if version == LEGACY_DEFAULTS_VERSION:
        given = {**LEGACY_DEFAULTS[part].get(name, {}), **given}
    return resolve(given)


def stamp(
    strategy: StrategySpec, weighting: WeightingSpec, version: int
) -> tuple[StrategySpec, WeightingSpec]:
    """Both parts of a spec with every parameter written out, the absent ones at the defaults of
    `version`. An unknown method name is left as given, for the spec's validation to name."""
    params = written_out("strategy", strategy.name, strategy.params, version)
    if params is not None:
        strategy = replace(strategy, params=params)
    params = written_out("weighting", weighting.name, weighting.params, version)
    if params is not None:
        weighting = replace(weighting, params=params)
    return strategy, weighting
