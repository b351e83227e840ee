"""Parameter schemas of the instance-weighting methods, kept free of torch.

Spec validation (`mixer.spec`) and the service read these without importing torch; the
torch functions in `loss_based`, `topic`, `dwm` and `presence` take the parsed objects. Each `parse`
raises one `SpecError` naming `weighting.params.<field>`.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from mixer.errors import SpecError
from mixer.signals import MAX_STEP, MAX_TOPIC_ID

# Sow et al.'s strategies by their paper names; "mid" is the reference repo's name for Quadratic.
LOSS_METHODS = ("linupper", "quadratic", "extremes", "upper", "uniform")
LOSS_ALIASES = {"mid": "quadratic"}
DWM_OPTIMIZERS = ("adam", "sgd")
DWM_MODELS = ("batch-context", "mlp-features")
DWM_MAX_HIDDEN = 256
DWM_FIXED_FEATURES = 4  # loss, relative loss, length, progress; then domain one-hot, topic multi-hot
# Below the spec's own 1 MiB bound; a batch-context model of 64 features and 128 hidden units
# is ~170 KB as safetensors, ~230 K characters as base64.
DWM_MAX_INIT_CHARS = 768 << 10


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


def _at_most(name: str, v: Any, hi: float) -> Any:
    if v > hi:
        raise SpecError(_where(name), f"must be at most {int(hi) if float(hi).is_integer() else hi}, got {v!r}")
    return v


def _hidden(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= DWM_MAX_HIDDEN:
        raise SpecError(_where("hidden"), f"must be an integer in [1, {DWM_MAX_HIDDEN}], got {v!r}")
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
    normalize: bool = True
    """Rescale the weights to sum to the global batch size (ours); false: the reference's raw weights."""

    NAMES = frozenset({"topic_weights", "normalize"})

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
        normalize = given.get("normalize", True)
        if not isinstance(normalize, bool):
            raise SpecError(_where("normalize"), f"must be true or false, got {normalize!r}")
        return cls(topic_weights=weights, normalize=normalize)

    def to_dict(self) -> dict[str, Any]:
        return {"topic_weights": list(self.topic_weights), "normalize": self.normalize}


@dataclass(kw_only=True, slots=True, frozen=True)
class DwmParams:
    """DWM weighting model: its architecture, its optimiser, the feature layout both sides must
    share, and where a transferred model comes from."""

    model: str = "batch-context"
    """batch-context (the in-batch weighting model, default) | mlp-features (the per-sample MLP)."""
    hidden: int = 32
    """Hidden units of the weighting model's layers."""
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
    init_from: str = ""
    """A trained weighting model to start from (base64 of its safetensors blob; a client resolves a
    file path to this form when it loads the spec); empty: a fresh model from the job seed."""
    frozen: bool = False
    """Apply the `init_from` model unchanged: the service never trains it and workers skip the probe."""

    NAMES = frozenset(
        {
            "model",
            "hidden",
            "lr",
            "eta",
            "optimizer",
            "momentum",
            "num_topics",
            "seq_len",
            "total_steps",
            "init_from",
            "frozen",
        }
    )

    @classmethod
    def parse(cls, given: dict[str, Any]) -> DwmParams:
        _no_unknown("dwm", given, cls.NAMES)
        model = given.get("model", "batch-context")
        if model not in DWM_MODELS:
            raise SpecError(_where("model"), f"must be one of {', '.join(DWM_MODELS)}, got {model!r}")
        init_from = given.get("init_from", "")
        if not isinstance(init_from, str) or len(init_from) > DWM_MAX_INIT_CHARS:
            raise SpecError(
                _where("init_from"),
                f"must be a base64 string of at most {DWM_MAX_INIT_CHARS} characters "
                f"(a DWM blob from `export_weighting_model`), got {type(init_from).__name__}",
            )
        if init_from:
            try:
                base64.b64decode(init_from, validate=True)
            except (binascii.Error, ValueError):
                raise SpecError(
                    _where("init_from"),
                    "is not base64; give the exported model's base64 text, or a file path the client "
                    "resolves when it loads the spec",
                ) from None
        frozen = given.get("frozen", False)
        if not isinstance(frozen, bool):
            raise SpecError(_where("frozen"), f"must be true or false, got {frozen!r}")
        if frozen and not init_from:
            raise SpecError(_where("frozen"), "needs weighting.params.init_from: a frozen model must come from somewhere")
        opt = given.get("optimizer", "adam")
        if opt not in DWM_OPTIMIZERS:
            raise SpecError(_where("optimizer"), f"must be one of {', '.join(DWM_OPTIMIZERS)}, got {opt!r}")
        momentum = given.get("momentum", 0.9)
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise SpecError(_where("momentum"), f"must lie in [0, 1), got {momentum!r}")
        return cls(
            hidden=_hidden(given.get("hidden", 32)),
            lr=_at_most("lr", _positive("lr", given.get("lr", 1e-3)), 1.0),
            eta=_at_most("eta", _positive("eta", given.get("eta", 1.0)), 1e6),
            optimizer=opt,
            momentum=float(momentum),
            num_topics=_at_most("num_topics", _int("num_topics", given.get("num_topics", 0), 0), MAX_TOPIC_ID),
            seq_len=_at_most("seq_len", _int("seq_len", given.get("seq_len", 4096), 1), 1 << 24),
            total_steps=_at_most(
                "total_steps", _int("total_steps", given.get("total_steps", 100_000), 1), MAX_STEP - 1
            ),
            model=model,
            init_from=init_from,
            frozen=frozen,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PRESENCE_NORMALIZE = ("none", "mean")
PRESENCE_MAX_TAU = 1e6
PRESENCE_MIN_TAU = 1e-6


def _tau(name: str, v: Any, sign: int) -> float:
    """A temperature of the given sign with PRESENCE_MIN_TAU <= |tau| <= PRESENCE_MAX_TAU."""
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
    if not ok or not PRESENCE_MIN_TAU <= sign * v <= PRESENCE_MAX_TAU:
        lo, hi = sorted((sign * PRESENCE_MIN_TAU, sign * PRESENCE_MAX_TAU))
        raise SpecError(_where(name), f"must be a number in [{lo:g}, {hi:g}], got {v!r}")
    return float(v)


@dataclass(kw_only=True, slots=True, frozen=True)
class PresenceParams:
    """PRESENCE (Thakkar et al. 2023) self-influence reweighting: w = N softmax(s / tau) per batch,
    tau_1 > 0 before `switch_step` (favour high self-influence), tau_2 < 0 from it on (damp it).
    Defaults are ours (the paper gives no universal values); see mixer.weighting.presence."""

    tau_1: float = 1.0
    """Stage-1 temperature, > 0: high self-influence samples get more weight (novelty)."""
    tau_2: float = -1.0
    """Stage-2 temperature, < 0: high self-influence samples get less weight (stability)."""
    switch_step: int = 1000
    """The first training step of stage 2 (0: stage 2 from the start)."""
    normalize: str = "none"
    """none: the paper's raw scores | mean: scores divided by the batch mean first (ours)."""

    NAMES = frozenset({"tau_1", "tau_2", "switch_step", "normalize"})

    @classmethod
    def parse(cls, given: dict[str, Any]) -> PresenceParams:
        _no_unknown("presence", given, cls.NAMES)
        normalize = given.get("normalize", "none")
        if normalize not in PRESENCE_NORMALIZE:
            raise SpecError(
                _where("normalize"), f"must be one of {', '.join(PRESENCE_NORMALIZE)}, got {normalize!r}"
            )
        return cls(
            tau_1=_tau("tau_1", given.get("tau_1", 1.0), 1),
            tau_2=_tau("tau_2", given.get("tau_2", -1.0), -1),
            switch_step=_at_most(
                "switch_step", _int("switch_step", given.get("switch_step", 1000), 0), MAX_STEP
            ),
            normalize=normalize,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_init_from(params: DwmParams, num_domains: int) -> None:
    """Refuse an `init_from` model whose feature count cannot fit this job (read from the blob's
    safetensors header, without torch); the full check happens where the model is loaded."""
    where = _where("init_from")
    blob = base64.b64decode(params.init_from)
    try:
        size = int.from_bytes(blob[:8], "little")
        if not 0 < size <= len(blob) - 8:
            raise ValueError("header size out of range")
        meta = json.loads(blob[8 : 8 + size]).get("__metadata__") or {}
        features = int(meta["num_features"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise SpecError(where, f"is not an exported DWM model (safetensors header unreadable: {e})") from None
    if meta.get("format") != "mixer.dwm/1":
        raise SpecError(where, f"holds format {meta.get('format')!r}, not a DWM model ('mixer.dwm/1')")
    want = DWM_FIXED_FEATURES + num_domains + params.num_topics
    if features != want:
        raise SpecError(
            where,
            f"holds a model of {features} features; this job needs {want} "
            f"({DWM_FIXED_FEATURES} + {num_domains} domains + {params.num_topics} topics)",
        )


TOKEN_MAX_ALPHA = 16.0


@dataclass(kw_only=True, slots=True, frozen=True)
class TokenLossParams:
    """TLDR (Jiang et al. 2020) token-loss reweighting, w_t = cos(pi exp(-l_t)) + 1, rescaled so
    the weights of the loss-bearing tokens sum to their count; see mixer.weighting.token."""

    burn_in: int = 0
    """Steps with uniform token weights before reweighting starts (ours; the paper starts at once)."""

    NAMES = frozenset({"burn_in"})

    @classmethod
    def parse(cls, given: dict[str, Any]) -> TokenLossParams:
        _no_unknown("token-loss", given, cls.NAMES)
        return cls(burn_in=_at_most("burn_in", _int("burn_in", given.get("burn_in", 0), 0), MAX_STEP))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(kw_only=True, slots=True, frozen=True)
class TokenReferenceParams:
    """PRIOR (Chen et al. 2025) reference-probability reweighting, w_t = (1 - p_ref(x_t))^alpha,
    rescaled so the weights of the loss-bearing tokens sum to their count; see mixer.weighting.token."""

    alpha: float = 1.0
    """Exponent on 1 - p_ref, in [0, 16]: 0 is plain next-token prediction, larger is sharper."""
    burn_in: int = 0
    """Steps with uniform token weights before reweighting starts (ours)."""

    NAMES = frozenset({"alpha", "burn_in"})

    @classmethod
    def parse(cls, given: dict[str, Any]) -> TokenReferenceParams:
        _no_unknown("token-reference", given, cls.NAMES)
        alpha = given.get("alpha", 1.0)
        ok = not isinstance(alpha, bool) and isinstance(alpha, (int, float)) and math.isfinite(alpha)
        if not ok or not 0.0 <= alpha <= TOKEN_MAX_ALPHA:
            raise SpecError(_where("alpha"), f"must be a number in [0, {TOKEN_MAX_ALPHA:g}], got {alpha!r}")
        return cls(
            alpha=float(alpha),
            burn_in=_at_most("burn_in", _int("burn_in", given.get("burn_in", 0), 0), MAX_STEP),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
