"""The configuration trees (mixer.config): options, --set, --config, ranges and precedence."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from mixer.config import (
    ConfigError,
    _optionable,
    check,
    from_options,
    leaves,
    options,
    override,
    setting,
    to_dict,
)
from mixer.megatron.config import PretrainConfig


@dataclass
class Inner:
    width: int = setting(8, min=1, max=64, aliases=("--w",), help="width")
    ratio: float = setting(0.5, min=0.0, max=1.0)
    timeout: float = setting(10.0, gt=0.0, max=60.0, unit="seconds", help="a timeout")
    beta: float = setting(0.9, min=0.0, lt=1.0)
    rate: float = setting(1.0, gt=0.0)
    pair: tuple[float, float] = setting((0.9, 0.95), min=0.0, lt=1.0, help="a tuple: --set only")
    targets: list[int] = setting(default_factory=list, derived=True)

    def validate(self) -> None:
        if self.width % 2:
            raise ValueError(f"inner.width must be even, got {self.width}")


@dataclass
class Tree:
    name: str = setting("a", choices=("a", "b"))
    path: Path | None = setting(None)
    fast: bool = setting(False)
    inner: Inner = field(default_factory=Inner)


def _command(tree: type):
    seen: list = []

    @click.command()
    @options(tree)
    def cmd(**kw):
        seen.append(from_options(tree, kw))

    return cmd, seen


def _run(tree: type, *args: str):
    cmd, seen = _command(tree)
    result = CliRunner().invoke(cmd, list(args))
    return result, (seen[0] if seen else None)


def test_every_optionable_leaf_is_an_option_and_aliases_work() -> None:
    cmd, _ = _command(Tree)
    names = {o for p in cmd.params for o in p.opts}
    for leaf in leaves(Tree):
        plain = (
            leaf.setting.option
            and not leaf.setting.derived
            and leaf.type in (str, int, float, bool, Path | None)
        )
        assert (leaf.flag in names) == plain, leaf.path
        for alias in leaf.setting.aliases:
            assert alias in names
    res, cfg = _run(Tree, "--w", "16", "--fast", "--name", "b")
    assert res.exit_code == 0, res.output
    assert (cfg.inner.width, cfg.fast, cfg.name) == (16, True, "b")


def test_precedence_defaults_file_set_options(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"inner": {"width": 4, "ratio": 0.25}, "name": "b"}))
    _, cfg = _run(Tree, "--config", str(f))
    assert (cfg.inner.width, cfg.inner.ratio, cfg.name) == (4, 0.25, "b")
    _, cfg = _run(Tree, "--config", str(f), "--set", "inner.width=6", "--set", "inner.pair=[0.8, 0.9]")
    assert (cfg.inner.width, cfg.inner.ratio, cfg.inner.pair) == (6, 0.25, (0.8, 0.9))
    _, cfg = _run(Tree, "--config", str(f), "--set", "inner.width=6", "--width", "10")
    assert cfg.inner.width == 10
    # An option left at its default does not undo the file.
    _, cfg = _run(Tree, "--config", str(f), "--width", "8")
    assert cfg.inner.width == 8


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "inner.widht=4"], "unknown setting 'inner.widht' (did you mean inner.width"),
        (["--set", "inner.width"], "expected KEY=VALUE"),
        (["--set", "inner.width=abc"], "inner.width (--width): 'abc' is not a valid int"),
        (["--set", "inner.width=100"], "inner.width (--width): must be in [1, 64], got 100"),
        (["--set", "inner.timeout=0"], "inner.timeout (--timeout): must be in (0, 60] seconds, got 0.0"),
        (["--set", "inner.timeout=61"], "inner.timeout (--timeout): must be in (0, 60] seconds, got 61.0"),
        (["--set", "inner.beta=1"], "inner.beta (--beta): must be in [0, 1), got 1.0"),
        (["--set", "inner.rate=0"], "inner.rate (--rate): must be > 0, got 0.0"),
        (["--set", "inner.ratio=nan"], "inner.ratio (--ratio): must be a number, got NaN"),
        (["--set", "inner.pair=[0.9, 1.0]"], "inner.pair[1]: must be in [0, 1), got 1.0"),
        (["--timeout", "0"], "0<x<=60"),
        (["--set", "inner.width=3"], "inner.width must be even"),
        (["--set", "inner.targets=[1]"], "unknown setting 'inner.targets'"),
        (["--set", "name=c"], "name (--name): 'c' is not one of a, b"),
        (["--set", "fast=maybe"], "fast (--fast): 'maybe' is not a valid bool"),
    ],
)
def test_bad_settings_are_named(args: list[str], message: str) -> None:
    @click.command()
    @options(Tree)
    def wrapped(**kw):
        try:
            from_options(Tree, kw)
        except ConfigError as e:
            raise click.ClickException(str(e)) from None

    res = CliRunner().invoke(wrapped, args)
    assert res.exit_code != 0 and message in res.output, res.output


def test_a_config_file_with_an_unknown_key_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("inner:\n  depth: 3\n")
    with pytest.raises(ConfigError, match="unknown setting 'inner.depth'"):
        override(Tree(), {"inner.depth": 3})
    res, cfg = _run(Tree, "--config", str(f))
    assert cfg is None and isinstance(res.exception, ConfigError)


def test_to_dict_round_trips_through_a_config_file(tmp_path: Path) -> None:
    cfg = PretrainConfig.of(spec=tmp_path / "s.yaml", steps=7, hidden=32, heads=2, save=tmp_path / "ck")
    data = to_dict(cfg)
    assert data["train"]["model"]["hidden_size"] == 32 and data["train"]["checkpoint_dir"] == str(
        tmp_path / "ck"
    )
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({k: v for k, v in data.items()}))
    from mixer.config import _flatten

    derived = {leaf.path for leaf in leaves(PretrainConfig) if leaf.setting.derived}
    again = check(override(PretrainConfig(), {k: v for k, v in _flatten(data).items() if k not in derived}))
    assert to_dict(again) == data


def test_pretrain_options_cover_the_tree_and_names_are_unique() -> None:
    from mixer.cli.data import pretrain

    names = [o for p in pretrain.params for o in p.opts]
    assert len(names) == len(set(names))
    for leaf in leaves(PretrainConfig):
        if _optionable(leaf):
            assert leaf.flag in names, leaf.path


def test_pretrain_config_checks_ranges_and_rules(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train.model.num_attention_heads|hidden_size 30 is not divisible"):
        PretrainConfig.of(spec=tmp_path / "s.yaml", hidden=30, heads=4)
    with pytest.raises(ConfigError, match="vocab_size"):
        PretrainConfig.of(spec=tmp_path / "s.yaml", vocab_size=100)
    with pytest.raises(ConfigError, match="run.spec"):
        check(PretrainConfig())
    with pytest.raises(ConfigError, match="unknown pretraining setting"):
        PretrainConfig.of(spec=tmp_path / "s.yaml", hiden=3)
    with pytest.raises(ConfigError, match=r"checkpoint_every \(--save-interval\) needs checkpoint_dir"):
        PretrainConfig.of(spec=tmp_path / "s.yaml", save_interval=5)


def test_serve_options_come_from_its_tree_and_bad_values_are_named(tmp_path: Path) -> None:
    from mixer.cli.serve import serve
    from mixer.server.config import ServeConfig

    names = [o for p in serve.params for o in p.opts]
    assert len(names) == len(set(names))
    for leaf in leaves(ServeConfig):
        assert (leaf.flag in names) == _optionable(leaf), leaf.path
    db = tmp_path / "m.db"
    res = CliRunner().invoke(serve, ["--db", str(db), "--set", "max_domains=0"])
    assert res.exit_code == 2 and "max_domains (--max-domains): must be >= 1, got 0" in res.output, res.output
    f = tmp_path / "serve.yaml"
    f.write_text("workers: 3\n")  # several processes need PostgreSQL: refused before anything starts
    res = CliRunner().invoke(serve, ["--db", str(db), "--config", str(f)])
    assert res.exit_code == 2 and "--workers 3 needs a shared PostgreSQL database" in res.output, res.output
    assert not db.exists()


@pytest.mark.parametrize(
    ("option", "shown"),
    [
        ("--width", "[1<=x<=64]"),
        ("--timeout", "[0.0<x<=60.0]"),
        ("--beta", "[0.0<=x<1.0]"),
        ("--rate", "[x>0.0]"),
    ],
)
def test_help_shows_each_range(option: str, shown: str) -> None:
    cmd, _ = _command(Tree)
    (param,) = [p for p in cmd.params if option in p.opts]
    help_text = " ".join(param.get_help_record(click.Context(cmd)))
    assert shown in help_text, help_text


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ({"min": 0, "gt": 0}, "give min= or gt=, not both"),
        ({"max": 1, "lt": 1}, "give max= or lt=, not both"),
    ],
)
def test_a_range_declared_twice_is_refused(meta: dict, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        setting(0.5, **meta)


SERVE_RANGES = [
    ("hello_timeout", 0, "hello_timeout (--hello-timeout): must be in (0, 86400] seconds, got 0"),
    ("http_timeout", 86401.0, "http_timeout (--http-timeout): must be in (0, 86400] seconds, got 86401.0"),
    (
        "http_max_connections",
        0,
        "http_max_connections (--http-max-connections): must be in [1, 1000000], got 0",
    ),
    (
        "max_pending_sessions",
        10**6 + 1,
        "max_pending_sessions (--max-pending-sessions): must be in [1, 1000000]",
    ),
    ("workers", 257, "workers (--workers): must be in [1, 256], got 257"),
    ("lease_ttl", 0.05, "lease_ttl (--lease-ttl): must be in [0.1, 86400] seconds, got 0.05"),
]


@pytest.mark.parametrize(("name", "value", "message"), SERVE_RANGES)
def test_serve_ranges_are_declared_on_the_settings(name: str, value: float, message: str) -> None:
    from mixer.server.config import ServeConfig

    with pytest.raises(ConfigError) as err:
        check(ServeConfig(**{name: value}))
    assert message in str(err.value)


PRETRAIN_RANGES = [
    ({"lr": 0}, "train.lr (--lr): must be > 0, got 0"),
    ({"min_lr": 0.1, "lr": 0.01}, "min_lr (--min-lr) 0.1 must be <= lr (--lr) 0.01"),
    ({"heads": 0}, "train.model.num_attention_heads (--num-attention-heads): must be >= 1, got 0"),
    ({"vocab_size": 1}, "train.model.vocab_size (--vocab-size): must be >= 2, got 1"),
    ({"keep_steps": 0}, "train.keep_steps (--keep-steps): must be >= 1, got 0"),
    ({"betas": (0.9, 1.0)}, "train.betas[1]: must be in [0, 1), got 1.0"),
    ({"betas": (0.9,)}, "betas must be two numbers"),
]


@pytest.mark.parametrize(("flat", "message"), PRETRAIN_RANGES)
def test_pretrain_ranges_are_declared_on_the_settings(tmp_path: Path, flat: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        PretrainConfig.of(spec=tmp_path / "s.yaml", **flat)
    assert message in str(err.value)
