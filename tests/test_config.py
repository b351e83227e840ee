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
    pair: tuple[float, float] = setting((0.9, 0.95), help="a tuple: --set only")
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
        (["--set", "inner.width=100"], "inner.width (--width): must be <= 64, got 100"),
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
    assert res.exit_code != 0 and "--workers 3 needs a shared PostgreSQL database" in str(res.exception or res.output)
    assert not db.exists()
