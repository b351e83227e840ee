"""Pure domain-level mixing strategies, one module each, found by name."""

from __future__ import annotations

from mixer.spec import JobSpec, SpecError
from mixer.strategies.base import Decision, State, Strategy, decode_state, encode_state

REGISTRY: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make a strategy selectable by its `name` in job specs."""
    REGISTRY[cls.name] = cls
    return cls


def strategy_class(name: str) -> type[Strategy]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise SpecError("strategy.name", f"unknown strategy {name!r}; available: {', '.join(sorted(REGISTRY))}") from None


def build_strategy(spec: JobSpec) -> Strategy:
    strategy = strategy_class(spec.strategy.name)(spec)
    strategy.validate()
    return strategy


def validate_strategy_spec(spec: JobSpec) -> None:
    build_strategy(spec)


# Registration happens on import; keep this list in sync with the strategy modules in this folder
# (ado_fit.py is a helper of ado.py and registers nothing).
from mixer.strategies import ado, aioli, dga, doremi, dwm, odm, static, toremi  # noqa: E402,F401

__all__ = ["Decision", "REGISTRY", "State", "Strategy", "build_strategy", "decode_state", "encode_state", "register"]
