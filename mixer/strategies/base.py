"""The strategy interface every domain-level mixing method implements.

A strategy is pure: `init(seed) -> state` and `update(state, window) -> (state, decision)`.
No I/O, no clocks, no global RNG: randomness comes from a numpy Generator whose state lives
in the strategy state, so the server, replay, sweeps and tests run the same trajectory.
State is a flat dict of numpy arrays and plain scalars; `encode_state` / `decode_state`
round-trip it exactly.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from mixer.errors import SpecError
from mixer.signals import Window

if TYPE_CHECKING:
    from mixer.spec import JobSpec

State = dict[str, Any]

REGISTRY: dict[str, type[Strategy]] = {}
"""Strategy classes by name (filled by `register` as mixer.strategies imports each module)."""


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make a strategy selectable by its `name` in job specs."""
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"two strategies named {cls.name!r}: {REGISTRY[cls.name].__module__} and {cls.__module__}")
    REGISTRY[cls.name] = cls
    return cls


@dataclass(slots=True)
class Decision:
    """A strategy's output at one update."""

    weights: np.ndarray
    """Domain weights (K), non-negative; the engine normalises, floors and caps them."""
    params: dict[str, Any] = field(default_factory=dict)
    """JSON-able parameters workers need (instance weighting, topic weights, diagnostics)."""
    blob: bytes = b""
    """Binary parameters (e.g. a weighting model as safetensors bytes)."""


class Strategy:
    """Base class: subclasses set `name`, `signals`, `defaults` and implement init/update."""

    name: ClassVar[str] = ""
    signals: ClassVar[frozenset[str]] = frozenset()
    """Signal kinds (mixer.signals.*) this strategy needs from workers."""
    defaults: ClassVar[dict[str, Any]] = {}
    """Hyperparameters and their defaults (the paper's or its reference code's)."""

    def __init__(self, spec: JobSpec):
        self.spec = spec
        self.K = spec.num_domains
        self.prior = np.asarray(spec.prior(), dtype=np.float64)
        self.params = self.resolve_params(spec.strategy.params)

    @classmethod
    def resolve_params(cls, given: dict[str, Any]) -> dict[str, Any]:
        """Defaults overlaid with the spec's params; unknown names are an error."""
        unknown = sorted(set(given) - set(cls.defaults))
        if unknown:
            allowed = ", ".join(sorted(cls.defaults)) or "none"
            raise SpecError(f"strategy.params.{unknown[0]}", f"unknown parameter for {cls.name!r}; allowed: {allowed}")
        out = dict(cls.defaults)
        for k, v in given.items():
            default = cls.defaults[k]
            if isinstance(default, bool):
                if not isinstance(v, bool):
                    raise SpecError(f"strategy.params.{k}", f"must be true or false, got {v!r}")
            elif isinstance(default, (int, float)) and default is not None:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
                    raise SpecError(f"strategy.params.{k}", f"must be a finite number, got {v!r}")
                v = type(default)(v) if isinstance(default, float) else v
            out[k] = v
        return out

    def validate(self) -> None:
        """Check parameter ranges; raise SpecError naming `strategy.params.<name>`."""

    def init(self, seed: int) -> State:
        raise NotImplementedError

    def update(self, state: State, window: Window) -> tuple[State, Decision | None]:
        raise NotImplementedError

    def check(self, name: str, ok: bool, what: str) -> None:
        if not ok:
            raise SpecError(f"strategy.params.{name}", f"{what}, got {self.params[name]!r}")


def new_rng(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))


def rng_state(rng: np.random.Generator) -> dict[str, Any]:
    return rng.bit_generator.state


def rng_from_state(state: dict[str, Any]) -> np.random.Generator:
    bg = np.random.PCG64()
    bg.state = state
    return np.random.Generator(bg)


def _encode(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return {"__nd__": v.dtype.str, "shape": list(v.shape), "b64": base64.b64encode(np.ascontiguousarray(v).tobytes()).decode()}
    if isinstance(v, dict):
        return {str(k): _encode(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_encode(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, float):
        # repr round-trips floats exactly; JSON alone cannot carry inf/nan portably.
        return {"__f__": repr(v)}
    return v


def _decode(v: Any) -> Any:
    if isinstance(v, dict):
        if "__nd__" in v:
            return np.frombuffer(base64.b64decode(v["b64"]), dtype=np.dtype(v["__nd__"])).reshape(v["shape"]).copy()
        if "__f__" in v:
            return float(v["__f__"])
        return {k: _decode(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_decode(x) for x in v]
    return v


def encode_state(state: Any) -> bytes:
    """Serialise a strategy or engine state exactly (arrays keep dtype and every bit)."""
    return json.dumps(_encode(state), sort_keys=True, separators=(",", ":")).encode()


def decode_state(data: bytes) -> Any:
    return _decode(json.loads(data))
