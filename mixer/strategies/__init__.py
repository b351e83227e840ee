"""Pure domain-level mixing strategies, one module each, found by name.

Every module in this folder is imported once, here; a module that defines a strategy class
decorated with `@register` makes it selectable by its `name` in job specs (README.md beside
this file says how to add one). Helper modules (base.py, ado_fit.py) register nothing.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

from mixer.errors import SpecError
from mixer.strategies.base import REGISTRY, Decision, State, Strategy, decode_state, encode_state, register

if TYPE_CHECKING:
    from mixer.spec import JobSpec


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


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["REGISTRY", "Decision", "State", "Strategy", "build_strategy", "decode_state", "encode_state", "register"]
