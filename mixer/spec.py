"""Job specs: the domains a job mixes, the strategy that mixes them, and the cadence.

A spec is plain data. `JobSpec.from_dict` validates everything and raises one `SpecError`
naming the field, what was wrong and what would be right. Specs load from YAML and from the
Megatron `--data-path 0.3 prefixA 0.7 prefixB` form.

A spec is stored complete, every parameter written out and marked with the `defaults_version`
it was resolved against; a spec stored before that resolves against the defaults of its time
(mixer.spec_defaults says how).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import yaml

from mixer.errors import SpecError
from mixer.signals import MAX_STEP
from mixer.spec_defaults import (
    DEFAULTS_VERSION,
    LEGACY_DEFAULTS_VERSION,
    check_defaults_version,
    known_version,
    stamp,
)

MAX_SPEC_BYTES = 1 << 20
"""A spec's text, and its stored (JSON) form, are at most 1 MiB."""
MAX_SPEC_DEPTH = 32
"""Nesting of mappings and lists in a spec (the deepest real spec, strategy params, is 4)."""
MAX_DOMAIN_WEIGHT = 1e15
"""Prior weights and domain sizes lie in [0, 1e15] (token counts of the largest corpora fit):
their sum over 100,000 domains stays finite, and so does the prior."""
MAX_SEED = (1 << 63) - 1
MAX_STEP_L1 = 2.0
"""The L1 distance between two mixtures is at most 2."""
OPTIONAL_CADENCE = ("max_step_ahead", "max_step_l1", "starvation_versions")
"""Cadence settings added after specs were first stored: left out of the stored form while
unset (None), so the fingerprints of specs written before them stay the same."""


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-5` as a string; specs mean a number (as YAML 1.2 and JSON do).

    Anchors and aliases are refused as they are read, and so is nesting deeper than
    MAX_SPEC_DEPTH: a few hundred bytes of nested aliases would otherwise expand to millions
    of nodes before any validation could look at them."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(
                None,
                None,
                "YAML anchors and aliases (&name, *name) are not allowed in a job spec",
                event.start_mark,
            )
        depth = getattr(self, "_depth", 0)
        if depth >= MAX_SPEC_DEPTH:
            raise yaml.composer.ComposerError(
                None, None, f"nested deeper than {MAX_SPEC_DEPTH} levels", event.start_mark
            )
        self._depth = depth + 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth = depth


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""A job name (whole string: `fullmatch`, so a trailing newline is not a name)."""
WEIGHT_UNITS = ("samples", "tokens")


@dataclass(kw_only=True, slots=True)
class DomainSpec:
    """One data domain."""

    name: str
    """Unique within the job; appears in metrics and tables."""
    prefix: str = ""
    """Megatron data prefix (path without .bin/.idx) the worker samples from."""
    weight: float = 1.0
    """Prior weight (normalised over domains); the strategy starts here."""
    size: float = 0.0
    """Domain size (documents or tokens); used by temperature sampling."""


@dataclass(kw_only=True, slots=True)
class StrategySpec:
    """Which domain-level strategy runs, and its parameters."""

    name: str = "static"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True, slots=True)
class WeightingSpec:
    """Instance-level weighting applied inside the worker's training step."""

    name: str = "none"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True, slots=True)
class CadenceSpec:
    """When the strategy updates and how its output is shaped."""

    update_every: int = 10
    """Steps between strategy updates."""
    warmup_steps: int = 0
    """No update before this step: the prior weights hold."""
    delay: int = 1
    """A version computed from step s takes effect at step s + delay."""
    min_weight: float = 0.0
    """Floor on every domain weight (guards against collapse)."""
    max_weight: float = 1.0
    """Cap on every domain weight."""
    prior_smoothing: float = 0.0
    """Mix this fraction of the prior back into every version."""
    snapshot_every: int = 50
    """Versions between snapshots of strategy state (restart = snapshot + log tail)."""
    max_step_lag: int = 100_000
    """Reports more than this many steps behind the newest step are rejected."""
    max_step_ahead: int | None = None
    """Reports more than this many steps ahead of the newest step (of 0 before the first report)
    are rejected; None: the same as max_step_lag, so that one report far ahead cannot leave
    honest reports too far behind. Left out of the stored spec while None (fingerprints of
    specs written before it existed stay the same)."""
    max_step_l1: float | None = None
    """Guardrail: the most one version may move from the last, as the L1 distance sum_i |w_i - w'_i|
    in (0, 2] (2 = any move; twice the total variation: 0.1 moves at most 5% of the mixture).
    Applied to the shaped weights (after floor, cap and prior smoothing): the version moves
    toward the proposal only as far as allowed, on the straight line, so it stays on the simplex
    within the floor and cap; later updates keep moving toward the last proposal until they
    reach it. None (the default): no bound. Left out of the stored spec while None."""
    starvation_versions: int | None = None
    """Guardrail: a domain at the floor (`min_weight`; with no floor, a weight below 1e-12) for
    this many consecutive versions is starving: listed (by index) in each such version's
    `params["starving"]` and reported by the metric `mixer_starving_domains`. None (the
    default): no detector and no `starving` entry. Left out of the stored spec while None."""

    @property
    def step_ahead(self) -> int:
        return self.max_step_lag if self.max_step_ahead is None else self.max_step_ahead


@dataclass(kw_only=True, slots=True)
class JobSpec:
    """Everything the service needs to mix one training job."""

    name: str
    domains: list[DomainSpec]
    strategy: StrategySpec = field(default_factory=StrategySpec)
    weighting: WeightingSpec = field(default_factory=WeightingSpec)
    cadence: CadenceSpec = field(default_factory=CadenceSpec)
    unit: str = "samples"
    """What weights are fractions of: samples or tokens."""
    seed: int = 0
    lineage: dict[str, Any] | None = None
    """Where the prior came from when the job was initialised from a proxy run (mixer.handoff):
    source_job, source ("server" or the exported file), average (the rule), final_version and
    max_step of the proxy. Informational: no strategy reads it."""
    defaults_version: int = DEFAULTS_VERSION
    """The defaults the parameters were resolved against: 2 (today's; a spec built by `from_dict`
    carries every parameter) or 1 (a spec stored before parameters were written out: its absent
    parameters take the defaults of that time, mixer.spec_defaults.LEGACY_DEFAULTS)."""
    stored_form: str | None = field(default=None, compare=False, repr=False)
    """A version-1 spec read from storage: its stored JSON, which stays its stored form and the
    source of its fingerprint (its resolved parameters are written out only in memory)."""

    @property
    def num_domains(self) -> int:
        return len(self.domains)

    @property
    def domain_names(self) -> list[str]:
        return [d.name for d in self.domains]

    def prior(self) -> list[float]:
        total = sum(d.weight for d in self.domains)
        return [d.weight / total for d in self.domains]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["stored_form"]
        for name in OPTIONAL_CADENCE:
            if d["cadence"][name] is None:
                del d["cadence"][name]
        if d["lineage"] is None:  # absent, so specs without one keep their fingerprints
            del d["lineage"]
        return d

    def to_json(self) -> str:
        """The stored form (a version-1 spec read from storage: the text it was stored as)."""
        if self.stored_form is not None:
            return self.stored_form
        return _canonical(self.to_dict())

    def resolved_json(self) -> str:
        """Everything that decides how the job runs, parameters resolved, without the stored
        form's history: two specs that run the same have the same text (CreateJob's "same job")."""
        d = self.to_dict()
        del d["defaults_version"]
        return _canonical(d)

    def same_job(self, spec_json: str, fingerprint: str) -> bool:
        """Whether a stored spec (its JSON and fingerprint) is this job: the same fingerprint, or,
        for a spec stored before parameters were written out, the same resolved form."""
        if fingerprint == self.fingerprint():
            return True
        try:
            stored = JobSpec.from_json(spec_json)
        except (SpecError, ValueError, TypeError):
            return False
        return stored.resolved_json() == self.resolved_json()

    @property
    def served_weighting_params(self) -> dict[str, Any]:
        """The weighting parameters every version carries (mixer.engine): as stored. A spec stored
        before parameters were written out served only the parameters it was given, so its replay
        serves those, not its resolved ones."""
        if self.stored_form is not None:
            stored = json.loads(self.stored_form).get("weighting") or {}
            return dict(stored.get("params") or {})
        return dict(self.weighting.params)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def fingerprint(self) -> str:
        """Stable hash of the whole spec: equal specs, equal fingerprints."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def validate(self) -> JobSpec:
        if not isinstance(self.name, str) or not NAME_RE.fullmatch(self.name):
            raise SpecError(
                "name", f"{self.name!r} must be 1-128 characters of letters, digits, '.', '_', '-'"
            )
        self._validate_domains()
        if self.unit not in WEIGHT_UNITS:
            raise SpecError("unit", f"{self.unit!r} is not one of {', '.join(WEIGHT_UNITS)}")
        check_defaults_version(self.defaults_version)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise SpecError("seed", f"must be an integer in [0, 2^63), got {self.seed!r}")
        self._validate_cadence()
        # Imported here: strategies import this module for the spec type.
        from mixer.strategies import validate_strategy_spec
        from mixer.weighting import validate_weighting_spec

        validate_strategy_spec(self)
        validate_weighting_spec(self)
        return self

    def _validate_domains(self) -> None:
        """Names unique and valid text; weights and sizes finite, non-negative, bounded."""
        if not self.domains:
            raise SpecError("domains", "at least one domain is required")
        seen: set[str] = set()
        for i, d in enumerate(self.domains):
            where = f"domains[{i}]"
            if not isinstance(d.name, str) or not d.name.strip():
                raise SpecError(f"{where}.name", "must be a non-empty string")
            if not _utf8(d.name):
                raise SpecError(f"{where}.name", "is not valid Unicode text (a lone surrogate)")
            if d.name in seen:
                raise SpecError(f"{where}.name", f"duplicate domain name {d.name!r}; names must be unique")
            seen.add(d.name)
            _finite_nonneg(f"{where}.weight", d.weight, MAX_DOMAIN_WEIGHT)
            _finite_nonneg(f"{where}.size", d.size, MAX_DOMAIN_WEIGHT)
        if sum(d.weight for d in self.domains) <= 0:
            raise SpecError(
                "domains", "prior weights sum to zero; give at least one domain a positive weight"
            )

    def _validate_cadence(self) -> None:
        """Step counts, weight floor and cap, step bound and prior smoothing, each in its range."""
        c = self.cadence
        # Step counts lie below 2^53, like steps: a step plus any of them stays exact and in int64.
        _positive_int("cadence.update_every", c.update_every)
        _nonneg_int("cadence.warmup_steps", c.warmup_steps)
        _nonneg_int("cadence.delay", c.delay)
        _positive_int("cadence.snapshot_every", c.snapshot_every)
        _positive_int("cadence.max_step_lag", c.max_step_lag)
        if c.max_step_ahead is not None:
            _positive_int("cadence.max_step_ahead", c.max_step_ahead)
        _finite_nonneg("cadence.min_weight", c.min_weight)
        _finite_nonneg("cadence.max_weight", c.max_weight)
        if c.min_weight * self.num_domains > 1.0:
            raise SpecError(
                "cadence.min_weight",
                f"{c.min_weight} x {self.num_domains} domains exceeds 1; use at most {1.0 / self.num_domains:.6g}",
            )
        if c.max_weight * self.num_domains < 1.0 or c.max_weight > 1.0:
            raise SpecError(
                "cadence.max_weight",
                f"must lie in [{1.0 / self.num_domains:.6g}, 1] for {self.num_domains} domains",
            )
        if c.min_weight > c.max_weight:
            raise SpecError("cadence.min_weight", "must not exceed cadence.max_weight")
        if c.max_step_l1 is not None and (
            isinstance(c.max_step_l1, bool)
            or not isinstance(c.max_step_l1, (int, float))
            or not 0.0 < c.max_step_l1 <= MAX_STEP_L1
        ):
            raise SpecError(
                "cadence.max_step_l1",
                f"must be a number in (0, 2] (the L1 distance one version may move; leave it out for no bound), got {c.max_step_l1!r}",
            )
        if c.starvation_versions is not None:
            _positive_int("cadence.starvation_versions", c.starvation_versions)
        if (
            isinstance(c.prior_smoothing, bool)
            or not isinstance(c.prior_smoothing, (int, float))
            or not 0.0 <= c.prior_smoothing <= 1.0
        ):
            raise SpecError("cadence.prior_smoothing", f"must lie in [0, 1], got {c.prior_smoothing}")

    @classmethod
    def from_dict(cls, data: Any) -> JobSpec:
        """Build and validate a spec from parsed YAML/JSON: a user's spec (no `defaults_version`)
        resolves against today's defaults, and every parameter is written out."""
        _check_depth(data)
        try:
            spec = cls._from_dict(data)
        except SpecError:
            raise
        except (TypeError, ValueError, AttributeError, OverflowError, RecursionError) as e:
            # A value of a type no check expected: still the caller's error, never the server's.
            raise SpecError(
                "spec", f"a value has the wrong type ({type(e).__name__}: {str(e)[:200]})"
            ) from None
        size = len(spec.to_json().encode("utf-8", "surrogatepass"))
        if size > MAX_SPEC_BYTES:
            raise SpecError("spec", f"is {size} bytes as stored; at most {MAX_SPEC_BYTES}")
        return spec

    @classmethod
    def _from_dict(cls, data: Any) -> JobSpec:
        if not isinstance(data, dict):
            raise SpecError("spec", f"must be a mapping, got {type(data).__name__}")
        _no_unknown(
            "spec",
            data,
            {
                "name",
                "domains",
                "data_path",
                "strategy",
                "weighting",
                "cadence",
                "unit",
                "seed",
                "lineage",
                "defaults_version",
            },
        )
        if "domains" in data and "data_path" in data:
            raise SpecError("data_path", "give either domains or data_path, not both")
        if "data_path" in data:
            domains = parse_data_path(data["data_path"])
        else:
            raw = data.get("domains")
            if not isinstance(raw, list):
                raise SpecError("domains", "must be a list of {name, prefix, weight, size}")
            domains = []
            for i, d in enumerate(raw):
                if isinstance(d, str):
                    d = {"name": d}
                if not isinstance(d, dict):
                    raise SpecError(f"domains[{i}]", "must be a mapping or a name")
                _no_unknown(f"domains[{i}]", d, {"name", "prefix", "weight", "size"})
                domains.append(
                    DomainSpec(
                        name=d.get("name"),
                        prefix=str(d.get("prefix", "")),
                        weight=_number(f"domains[{i}].weight", d.get("weight", 1.0)),
                        size=_number(f"domains[{i}].size", d.get("size", 0.0)),
                    )
                )
        strategy = _sub_spec("strategy", data.get("strategy", {}), StrategySpec)
        weighting = _sub_spec("weighting", data.get("weighting", {}), WeightingSpec)
        cad = data.get("cadence", {}) or {}
        if not isinstance(cad, dict):
            raise SpecError("cadence", "must be a mapping")
        allowed = set(CadenceSpec.__dataclass_fields__)
        _no_unknown("cadence", cad, allowed)
        cadence = CadenceSpec(**cad)
        version = data.get("defaults_version", DEFAULTS_VERSION)
        if known_version(version):
            strategy, weighting = stamp(strategy, weighting, version)
        spec = cls(
            name=data.get("name"),
            domains=domains,
            strategy=strategy,
            weighting=weighting,
            cadence=cadence,
            unit=data.get("unit", "samples"),
            seed=data.get("seed", 0),
            lineage=_lineage(data.get("lineage")),
            defaults_version=version,
        )
        return spec.validate()

    @classmethod
    def from_yaml(cls, text: str) -> JobSpec:
        if not isinstance(text, str):
            raise SpecError("spec", f"must be text, got {type(text).__name__}")
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > MAX_SPEC_BYTES:
            raise SpecError("spec", f"is {size} bytes; at most {MAX_SPEC_BYTES}")
        try:
            if text.lstrip().startswith("{"):
                try:
                    data = json.loads(text)  # JSON joins surrogate pairs; YAML 1.1 does not
                except json.JSONDecodeError:
                    pass
                except RecursionError:
                    raise SpecError("spec", f"nested deeper than {MAX_SPEC_DEPTH} levels") from None
                else:
                    return cls.from_dict(data)
            data = yaml.load(text, Loader=_Loader)  # a SafeLoader subclass
        except yaml.YAMLError as e:
            raise SpecError("spec", f"not valid YAML: {str(e)[:500]}") from None
        except RecursionError:
            raise SpecError("spec", f"nested deeper than {MAX_SPEC_DEPTH} levels") from None
        return cls.from_dict(data)

    @classmethod
    def from_json(cls, text: str) -> JobSpec:
        """A spec in its stored form. One without `defaults_version` was stored before parameters
        were written out: its absent parameters take that time's defaults (version 1), and its
        stored text stays its stored form and fingerprint."""
        data = json.loads(text)
        if not isinstance(data, dict) or "defaults_version" in data:
            return cls.from_dict(data)
        spec = cls.from_dict({**data, "defaults_version": LEGACY_DEFAULTS_VERSION})
        spec.stored_form = _canonical(data)
        return spec


def parse_data_path(value: Any) -> list[DomainSpec]:
    """Import Megatron's `--data-path 0.3 prefixA 0.7 prefixB` (or plain prefixes) as domains."""
    tokens = value.split() if isinstance(value, str) else list(value) if isinstance(value, list) else None
    if not tokens:
        raise SpecError("data_path", "must be a non-empty string or list like '0.3 prefixA 0.7 prefixB'")
    tokens = [str(t) for t in tokens]

    def is_number(t: str) -> bool:
        try:
            float(t)
            return True
        except ValueError:
            return False

    if is_number(tokens[0]):
        if len(tokens) % 2:
            raise SpecError(
                "data_path", "weighted form needs pairs of 'weight prefix'; got an odd number of items"
            )
        pairs = [(tokens[i], tokens[i + 1]) for i in range(0, len(tokens), 2)]
        for w, p in pairs:
            if not is_number(w):
                raise SpecError("data_path", f"expected a weight before prefix {p!r}, got {w!r}")
        weighted = [(float(w), p) for w, p in pairs]
    else:
        weighted = [(1.0, p) for p in tokens]
    domains, used = [], set()
    for w, p in weighted:
        base = p.rstrip("/").rsplit("/", 1)[-1] or p
        name, n = base, 1
        while name in used:
            n += 1
            name = f"{base}_{n}"
        used.add(name)
        domains.append(DomainSpec(name=name, prefix=p, weight=w))
    return domains


def _sub_spec(where: str, raw: Any, cls: type) -> Any:
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict):
        raise SpecError(where, "must be a name or a mapping {name, params}")
    _no_unknown(where, raw, {"name", "params"})
    params = raw.get("params", {}) or {}
    if not isinstance(params, dict):
        raise SpecError(f"{where}.params", "must be a mapping")
    return cls(
        name=str(raw.get("name", cls().name if where != "strategy" else "static")), params=dict(params)
    )


def _canonical(data: dict[str, Any]) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


LINEAGE_FIELDS = {"source_job": str, "source": str, "average": str, "final_version": int, "max_step": int}


def _lineage(data: Any) -> dict[str, Any] | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise SpecError("lineage", "must be a mapping")
    _no_unknown("lineage", data, set(LINEAGE_FIELDS))
    for key, kind in LINEAGE_FIELDS.items():
        v = data.get(key)
        if v is None or isinstance(v, bool) or not isinstance(v, kind):
            raise SpecError(f"lineage.{key}", f"must be {'text' if kind is str else 'an integer'}, got {v!r}")
        if kind is str and not 0 < len(v) <= 4096:
            raise SpecError(f"lineage.{key}", "must be 1 to 4096 characters")
        if kind is int and not -1 <= v < 2**53:
            raise SpecError(f"lineage.{key}", f"must lie in [-1, 2^53), got {v}")
    return dict(data)


def _no_unknown(where: str, data: dict, allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise SpecError(f"{where}.{unknown[0]}", f"unknown field; allowed: {', '.join(sorted(allowed))}")


def _number(where: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise SpecError(where, f"must be a number, got {v!r}")
    return float(v)


def _finite_nonneg(where: str, v: Any, high: float = math.inf) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise SpecError(where, f"must be a finite number >= 0, got {v!r}")
    if v > high:
        raise SpecError(where, f"must be at most {high:g}, got {v!r}")


def _positive_int(where: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 < v < MAX_STEP:
        raise SpecError(where, f"must be a positive integer below 2^53, got {v!r}")


def _nonneg_int(where: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < MAX_STEP:
        raise SpecError(where, f"must be an integer in [0, 2^53), got {v!r}")


def _check_depth(data: Any) -> None:
    """Refuse parsed data nested deeper than MAX_SPEC_DEPTH (iteratively: no recursion)."""
    stack = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > MAX_SPEC_DEPTH:
                raise SpecError("spec", f"nested deeper than {MAX_SPEC_DEPTH} levels")
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
