"""Run configurations: one tree of dataclasses per kind of run, and everything generated from it.

A kind of run (`mixer pretrain`, `mixer bench quality`, ...) declares its settings once, as nested
dataclasses whose fields are declared with `setting(default, help=..., min=..., ...)`. From that one
declaration come:

- the command-line options (`options(Tree)`): one per leaf, named after the leaf (`lr` is `--lr`,
  `hidden_size` is `--hidden-size`), booleans as `--x/--no-x`, older names kept as aliases;
- `--set KEY=VALUE` on any leaf by its dotted path (`--set train.weight_decay=0.05`), which reaches
  the settings too specialised for an option of their own (tuples, lists);
- `--config FILE`: the same tree as YAML (a mapping per section);
- range checking in one place (`check`): each leaf declares its bounds (`min=`/`max=` closed,
  `gt=`/`lt=` open), which the options' help shows too; then each section's own `validate()`
  for the rules that tie settings together.

Precedence, lowest first: the dataclass defaults, `--config FILE`, `--set`, explicit options (or
their environment variables). `to_dict` gives the resolved tree back as plain data, for the run's
record. Settings declared `derived=True` are filled in by the run itself (from the job spec) and
are neither options nor `--set` keys.

The shape follows torchtitan's `JobConfig` and OLMo-core's config dataclasses: the tree is the
configuration, the command line one view of it. The code is ours.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

import click
import yaml

__all__ = [
    "ConfigError",
    "Leaf",
    "check",
    "from_options",
    "leaves",
    "options",
    "override",
    "setting",
    "to_dict",
]


class ConfigError(ValueError):
    """A setting is unknown, malformed or out of range; the message names it (and its option)."""


@dataclass(frozen=True)
class Setting:
    """What a leaf declares besides its default."""

    help: str = ""
    min: float | None = None
    """The least value allowed (closed bound); of each element, for a tuple or list of numbers."""
    max: float | None = None
    """The greatest value allowed (closed bound)."""
    gt: float | None = None
    """The value must be greater than this (open bound); instead of `min`."""
    lt: float | None = None
    """The value must be less than this (open bound); instead of `max`."""
    unit: str = ""
    """Named after the range in an error message, e.g. "seconds"."""
    choices: tuple[str, ...] | None = None
    aliases: tuple[str, ...] = ()
    """Older or shorter option names, e.g. ("--layers",) for num_layers."""
    envvar: str | None = None
    exists: bool = False
    """A Path that must exist when given."""
    required: bool = False
    derived: bool = False
    """Filled in by the run (from the job spec): no option, no --set."""
    option: bool = True
    """False: reachable through --set and --config only."""
    default_text: str | None = None
    """What the help shows as the default, when the default itself (e.g. None) says little."""

    def __post_init__(self) -> None:
        if self.min is not None and self.gt is not None:
            raise TypeError(f"setting: give min= or gt=, not both (min={self.min}, gt={self.gt})")
        if self.max is not None and self.lt is not None:
            raise TypeError(f"setting: give max= or lt=, not both (max={self.max}, lt={self.lt})")

    @property
    def low(self) -> float | None:
        return self.gt if self.gt is not None else self.min

    @property
    def high(self) -> float | None:
        return self.lt if self.lt is not None else self.max

    def admits(self, value: float) -> bool:
        """Whether a number (not NaN) lies in the declared range."""
        return not (
            (self.gt is not None and value <= self.gt)
            or (self.min is not None and value < self.min)
            or (self.lt is not None and value >= self.lt)
            or (self.max is not None and value > self.max)
        )

    def range_text(self) -> str:
        """The declared range in words: `in [1, 64]`, `in (0, 86400] seconds`, `>= 0`, `< 1`."""
        lo, hi = self.low, self.high
        if lo is not None and hi is not None:
            left, right = "(" if self.gt is not None else "[", ")" if self.lt is not None else "]"
            text = f"in {left}{_num(lo)}, {_num(hi)}{right}"
        elif lo is not None:
            text = f"{'>' if self.gt is not None else '>='} {_num(lo)}"
        else:
            text = f"{'<' if self.lt is not None else '<='} {_num(hi)}"
        return f"{text} {self.unit}" if self.unit else text


def _num(x: float) -> str:
    """A bound as written: 86400.0 as 86400, 0.1 as 0.1."""
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e16:
        return str(int(x))
    return str(x) if isinstance(x, int) else f"{x:g}"


def setting(default: Any = MISSING, *, default_factory: Any = MISSING, **meta: Any) -> Any:
    """A dataclass field with its help, range and option names (see `Setting`)."""
    md = {"setting": Setting(**meta)}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=md)
    return field(default=default, metadata=md)


@dataclass(frozen=True)
class Leaf:
    """One setting of a tree: its dotted path, its type and its declaration."""

    path: str
    type: Any
    setting: Setting
    default: Any

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def param(self) -> str:
        return self.path.replace(".", "__")

    def describe(self) -> str:
        """The path, and the option where the leaf has one: `train.lr (--lr)`, `train.betas`."""
        return f"{self.path} ({self.flag})" if _optionable(self) else self.path


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


@functools.cache
def leaves(tree: type) -> tuple[Leaf, ...]:
    """Every leaf of a tree, depth first, in declaration order; defaults as `tree()` has them."""
    out: list[Leaf] = []

    def walk(cls: type, instance: Any, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            tp = hints[f.name]
            if _is_section(tp):
                walk(tp, getattr(instance, f.name), f"{prefix}{f.name}.")
                continue
            s = f.metadata.get("setting", Setting())
            out.append(Leaf(prefix + f.name, tp, s, getattr(instance, f.name)))

    walk(tree, tree(), "")
    return tuple(out)


def _base(tp: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else tp), True
    return tp, False


def _click_type(leaf: Leaf) -> Any:
    tp, _ = _base(leaf.type)
    s = leaf.setting
    if s.choices:
        return click.Choice(list(s.choices))
    if tp in (int, float):
        kind = click.IntRange if tp is int else click.FloatRange
        return kind(min=s.low, max=s.high, min_open=s.gt is not None, max_open=s.lt is not None)
    if tp is Path:
        return click.Path(exists=s.exists, path_type=Path)
    return str


def _optionable(leaf: Leaf) -> bool:
    tp, _ = _base(leaf.type)
    return leaf.setting.option and not leaf.setting.derived and tp in (int, float, str, bool, Path)


def options(tree: type, *, set_option: bool = True):
    """A decorator adding one option per leaf of `tree`, plus --config FILE and --set KEY=VALUE.

    The command receives them as keyword arguments; `from_options(tree, kwargs)` turns them back
    into the tree. set_option=False leaves --set to the command (a command whose --set means
    something else); --config FILE and `override` still reach every leaf."""
    seen: dict[str, str] = {}
    decorators = []
    for leaf in leaves(tree):
        if not _optionable(leaf):
            continue
        names = [leaf.flag, *leaf.setting.aliases]
        for n in names:
            if n in seen:
                raise TypeError(f"{tree.__name__}: option {n} names both {seen[n]} and {leaf.path}")
            seen[n] = leaf.path
        s = leaf.setting
        shown = s.default_text if s.default_text is not None else leaf.default
        help_text = s.help + (f"  [default: {shown}]" if shown not in (None, "") else "")
        if _base(leaf.type)[0] is bool:
            decl = [f"{leaf.flag}/--no-{leaf.flag[2:]}", *s.aliases, leaf.param]
            decorators.append(click.option(*decl, default=bool(leaf.default), envvar=s.envvar, help=s.help))
        else:
            decl = [*names, leaf.param]
            decorators.append(
                click.option(
                    *decl, type=_click_type(leaf), default=leaf.default, envvar=s.envvar, help=help_text
                )
            )
    decorators.append(
        click.option(
            "--config",
            "config_file",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            default=None,
            help="settings as YAML (a mapping per section); options given on the command line win",
        )
    )
    if set_option:
        decorators.append(
            click.option(
                "--set",
                "set_values",
                multiple=True,
                metavar="KEY=VALUE",
                help="set any setting by its dotted path, e.g. --set train.weight_decay=0.05 (repeatable)",
            )
        )

    def decorate(fn):
        for d in reversed(decorators):
            fn = d(fn)
        return fn

    return decorate


def _coerce(leaf: Leaf, value: Any) -> Any:
    """A value (from YAML, --set or an option) as the leaf's type; ConfigError when it is not one."""
    tp, optional = _base(leaf.type)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and tp is not str):
        if optional:
            return None
        raise ConfigError(f"{leaf.describe()}: must be set, got none")
    try:
        if tp is bool:
            if isinstance(value, str):
                low = value.lower()
                if low not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise ValueError(value)
                return low in ("true", "1", "yes", "on")
            if isinstance(value, (bool, int)) and value in (0, 1):
                return bool(value)
            raise ValueError(value)
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if tp is Path:
            return Path(value)
        if tp is str:
            return str(value)
        origin = typing.get_origin(tp)
        if origin in (tuple, list):
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if not isinstance(value, (list, tuple)):
                raise ValueError(value)
            (elem, *_rest) = typing.get_args(tp) or (Any,)
            items = [elem(v) if elem is not Any else v for v in value]
            return tuple(items) if origin is tuple else items
    except (TypeError, ValueError):
        raise ConfigError(
            f"{leaf.describe()}: {value!r} is not a valid {getattr(tp, '__name__', tp)}"
        ) from None
    return value


def _leaf(tree: type, key: str) -> Leaf:
    by_path = {leaf.path: leaf for leaf in leaves(tree) if not leaf.setting.derived}
    if key not in by_path:
        near = difflib.get_close_matches(key, list(by_path), n=3)
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        raise ConfigError(f"unknown setting {key!r}{hint}")
    return by_path[key]


def _assign(cfg: Any, path: str, value: Any) -> None:
    *sections, name = path.split(".")
    target = cfg
    for s in sections:
        target = getattr(target, s)
    setattr(target, name, value)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(
            f"{prefix.rstrip('.') or 'the config file'}: expected a mapping, got {type(data).__name__}"
        )
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def override(cfg: Any, values: dict[str, Any]) -> Any:
    """Set leaves of `cfg` (in place) by dotted path, each value coerced to its leaf's type."""
    tree = type(cfg)
    for key, value in values.items():
        leaf = _leaf(tree, key)
        _assign(cfg, key, _coerce(leaf, value))
    return cfg


def _parse_set(items: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.weight_decay=0.05")
        out[key.strip()] = value.strip()
    return out


def from_options(tree: type, kwargs: dict[str, Any], ctx: click.Context | None = None) -> Any:
    """The tree from a command's keyword arguments (see `options`), checked.

    Consumes the tree's own keyword arguments from `kwargs` and leaves the command's others."""
    ctx = ctx or click.get_current_context()
    cfg = tree()
    config_file = kwargs.pop("config_file", None)
    set_values = kwargs.pop("set_values", ())
    if config_file is not None:
        try:
            data = yaml.safe_load(Path(config_file).read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{config_file}: not YAML: {e}") from None
        override(cfg, _flatten(data))
    override(cfg, _parse_set(tuple(set_values)))
    for leaf in leaves(tree):
        if leaf.param not in kwargs:
            continue
        value = kwargs.pop(leaf.param)
        source = ctx.get_parameter_source(leaf.param)
        if source not in (click.core.ParameterSource.DEFAULT, None):
            _assign(cfg, leaf.path, _coerce(leaf, value))
    return check(cfg)


def check(cfg: Any) -> Any:
    """Check every leaf's type and range, then each section's validate(); returns cfg."""
    for leaf in leaves(type(cfg)):
        value = cfg
        for part in leaf.path.split("."):
            value = getattr(value, part)
        s = leaf.setting
        if value is None:
            if s.required:
                raise ConfigError(f"{leaf.describe()} is required")
            continue
        if s.choices and value not in s.choices:
            raise ConfigError(f"{leaf.describe()}: {value!r} is not one of {', '.join(s.choices)}")
        if isinstance(value, (tuple, list)):
            for i, item in enumerate(value):
                _check_number(f"{leaf.describe()}[{i}]", s, item)
        else:
            _check_number(leaf.describe(), s, value)
    _validate_sections(cfg)
    return cfg


def _check_number(name: str, s: Setting, value: Any) -> None:
    """ConfigError naming `name` when a number is NaN or out of the declared range."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if isinstance(value, float) and math.isnan(value):
        raise ConfigError(f"{name}: must be a number, got NaN")
    if (s.low is not None or s.high is not None) and not s.admits(value):
        raise ConfigError(f"{name}: must be {s.range_text()}, got {value}")


def _validate_sections(section: Any) -> None:
    for f in dataclasses.fields(section):
        sub = getattr(section, f.name)
        if dataclasses.is_dataclass(sub) and not isinstance(sub, type):
            _validate_sections(sub)
    validate = getattr(section, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(str(e)) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """The tree as plain JSON-able data (paths as strings, tuples as lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(cfg)
