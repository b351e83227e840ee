"""Parameter schemas of the instance-weighting methods, kept free of torch.

Spec validation (`mixer.spec`) and the service read these without importing torch; the
torch functions in `loss_based`, `topic` and `dwm` take the parsed objects. Each `parse`
raises one `SpecError` naming `weighting.params.<field>`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from mixer.spec import SpecError

# Sow et al.'s strategies by their paper names; "mid" is the reference repo's name for Quadratic.
LOSS_METHODS = ("linupper", "quadratic", "extremes", "upper", "uniform")
LOSS_ALIASES = {"mid": "quadratic"}
DWM_OPTIMIZERS = ("adam", "sgd")


def _where(name: str) -> str:
    return f"weighting.params.{name}"


def _positive(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise SpecError(_where(name), f"must be a finite number > 0, got {v!r}")
    return float(v)


def _nonneg_float(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise SpecError(_where(name), f"must be a finite number >= 0, got {v!r}")
    return float(v)


def _int(name: str, v: Any, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise SpecError(_where(name), f"must be an integer >= {lo}, got {v!r}")
    return v


def _no_unknown(method: str, given: dict[str, Any], allowed: frozenset[str]) -> None:
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise SpecError(
            _where(unknown[0]), f"unknown parameter for {method!r}; allowed: {', '.join(sorted(allowed))}"
        )


@dataclass(kw_only=True, slots=True, frozen=True)
class LossParams:
    """Sow et al. loss-based reweighting; defaults as the authors' released LinUpper configurations
    (ours_doge_large / ours_doremi_large: kl_reg r = 0.4; delta 1, 1,000 burn-in steps). The code's
    own FullTrainingArguments default is r = 1.0, which only the quadratic ("mid") no-DR config uses."""

    method: str = "linupper"
    """linupper | quadratic (alias mid) | extremes | upper | uniform."""
    delta: float = 1.0
    """Half-width of the interval [-delta, delta] the batch losses are mapped onto."""
    r: float = 0.4
    """Softmax temperature (the reference's kl_reg); small r sharpens the weights."""
    burn_in: int = 1000
    """Steps with uniform weights before reweighting starts (the reference's burnout_steps)."""

    NAMES = frozenset({"method", "delta", "r", "burn_in"})

    @classmethod
    def parse(cls, given: dict[str, Any]) -> LossParams:
        _no_unknown("loss", given, cls.NAMES)
        method = given.get("method", "linupper")
        if not isinstance(method, str) or LOSS_ALIASES.get(method, method) not in LOSS_METHODS:
            raise SpecError(
                _where("method"), f"must be one of {', '.join(LOSS_METHODS)} (or 'mid'), got {method!r}"
            )
        return cls(
            method=LOSS_ALIASES.get(method, method),
            delta=_positive("delta", given.get("delta", 1.0)),
            r=_positive("r", given.get("r", 0.4)),
            burn_in=_int("burn_in", given.get("burn_in", 1000), 0),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(kw_only=True, slots=True, frozen=True)
class TopicParams:
    """ToReMi topic weights; a version's `topic_weights` replaces the spec's initial list."""

    topic_weights: tuple[float, ...] = ()
    """Weight of each topic id (>= 0); empty means uniform until the service ships a version."""

    NAMES = frozenset({"topic_weights"})

    @classmethod
    def parse(cls, given: dict[str, Any]) -> TopicParams:
        _no_unknown("topic", given, cls.NAMES)
        raw = given.get("topic_weights", [])
        if not isinstance(raw, (list, tuple)):
            raise SpecError(
                _where("topic_weights"), f"must be a list of numbers >= 0, got {type(raw).__name__}"
            )
        weights = tuple(_nonneg_float(f"topic_weights[{i}]", v) for i, v in enumerate(raw))
        if weights and sum(weights) <= 0:
            raise SpecError(
                _where("topic_weights"), "all topic weights are zero; give at least one a positive weight"
            )
        return cls(topic_weights=weights)

    def to_dict(self) -> dict[str, Any]:
        return {"topic_weights": list(self.topic_weights)}


@dataclass(kw_only=True, slots=True, frozen=True)
class DwmParams:
    """DWM weighting model: MLP shape, its optimiser, and the feature layout both sides must share."""

    hidden: int = 32
    """Hidden units of the one-hidden-layer MLP."""
    lr: float = 1e-3
    """Learning rate of the weighting model's optimiser."""
    eta: float = 1.0
    """Model step size in the one-step unroll; Adam is nearly blind to its scale, so 1 is fine."""
    optimizer: str = "adam"
    """adam | sgd."""
    momentum: float = 0.9
    """EMA factor of each domain's running mean loss (the relative-loss feature)."""
    num_topics: int = 0
    """Topic ids get a multi-hot block of this width; 0 leaves topics out of the features."""
    seq_len: int = 4096
    """Lengths enter the features as tokens / seq_len."""
    total_steps: int = 100_000
    """Training progress enters the features as min(step / total_steps, 1)."""

    NAMES = frozenset(
        {"hidden", "lr", "eta", "optimizer", "momentum", "num_topics", "seq_len", "total_steps"}
    )

    @classmethod
    def parse(cls, given: dict[str, Any]) -> DwmParams:
        _no_unknown("dwm", given, cls.NAMES)
        opt = given.get("optimizer", "adam")
        if opt not in DWM_OPTIMIZERS:
            raise SpecError(_where("optimizer"), f"must be one of {', '.join(DWM_OPTIMIZERS)}, got {opt!r}")
        momentum = given.get("momentum", 0.9)
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise SpecError(_where("momentum"), f"must lie in [0, 1), got {momentum!r}")
        return cls(
            hidden=_int("hidden", given.get("hidden", 32), 1),
            lr=_positive("lr", given.get("lr", 1e-3)),
            eta=_positive("eta", given.get("eta", 1.0)),
            optimizer=opt,
            momentum=float(momentum),
            num_topics=_int("num_topics", given.get("num_topics", 0), 0),
            seq_len=_int("seq_len", given.get("seq_len", 4096), 1),
            total_steps=_int("total_steps", given.get("total_steps", 100_000), 1),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
