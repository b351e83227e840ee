"""Pure instance-level weighting: functions workers apply inside the training step.

The service owns and versions their parameters; workers evaluate them on each batch.
Methods: `loss` (Sow et al., loss_based.py), `topic` (ToReMi, topic.py), `dwm` (learned
weighting model, dwm.py), `presence` (PRESENCE self-influence reweighting, presence.py); per token, inside the loss:
`token-loss` (TLDR) and `token-reference` (PRIOR), token.py. This package imports no torch so that spec validation stays light;
import the method modules themselves for the torch functions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mixer.errors import SpecError
from mixer.weighting.params import (
    DwmParams,
    LossParams,
    PresenceParams,
    TokenLossParams,
    TokenReferenceParams,
    TopicParams,
)

if TYPE_CHECKING:
    from mixer.spec import JobSpec

# name -> allowed parameter names.
METHODS: dict[str, frozenset[str]] = {
    "none": frozenset(),
    "loss": LossParams.NAMES,
    "topic": TopicParams.NAMES,
    "dwm": DwmParams.NAMES,
    "presence": PresenceParams.NAMES,
    "token-loss": TokenLossParams.NAMES,
    "token-reference": TokenReferenceParams.NAMES,
}

# name -> parser that checks values too and returns the typed parameters.
PARSERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "loss": LossParams.parse,
    "topic": TopicParams.parse,
    "dwm": DwmParams.parse,
    "presence": PresenceParams.parse,
    "token-loss": TokenLossParams.parse,
    "token-reference": TokenReferenceParams.parse,
}


def validate_weighting_spec(spec: JobSpec) -> None:
    name = spec.weighting.name
    if name not in METHODS:
        raise SpecError(
            "weighting.name", f"unknown instance weighting {name!r}; available: {', '.join(sorted(METHODS))}"
        )
    unknown = sorted(set(spec.weighting.params) - METHODS[name])
    if unknown:
        allowed = ", ".join(sorted(METHODS[name])) or "none"
        raise SpecError(
            f"weighting.params.{unknown[0]}", f"unknown parameter for {name!r}; allowed: {allowed}"
        )
    if name in PARSERS:
        PARSERS[name](spec.weighting.params)


def parse_weighting_params(name: str, params: dict[str, Any]) -> Any:
    """Typed parameters of method `name` (LossParams, TopicParams, DwmParams, PresenceParams; None for 'none')."""
    if name not in METHODS:
        raise SpecError(
            "weighting.name", f"unknown instance weighting {name!r}; available: {', '.join(sorted(METHODS))}"
        )
    parser = PARSERS.get(name)
    return parser(params) if parser else None
