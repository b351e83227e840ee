"""What `mixer bench quality` compares: its strategies, model presets and options, and the job
spec each strategy runs with (the method's parameters scaled to the run). mixer.bench.quality
runs them."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mixer.bench.corpus import TOPICS_K
from mixer.config import setting
from mixer.weighting.params import DwmParams

__all__ = [
    "NEEDS_INPUT",
    "PRESETS",
    "QUICK_STRATEGIES",
    "STRATEGIES",
    "TRANSFER_SOURCE",
    "QualityConfig",
    "QualityRun",
    "check_overrides",
    "checked_strategies",
    "job_spec",
]

STRATEGIES = (
    "uniform",
    "natural",
    "doremi",
    "doremi-online",
    "odm",
    "ado",
    "aioli",
    "dga",
    "toremi",
    "loss-linupper",
    "presence",
    "token-loss",
    "token-reference",
    "dwm",
    "dwm-transfer",
    "agent",
)
# Strategies that need more than a name (the agent: --agent PATH) are not in "all".
NEEDS_INPUT = ("agent",)
QUICK_STRATEGIES = ("uniform", "odm", "doremi")
# dwm-transfer: the paper's transfer (a weighting model learned with a small LLM trains a larger one).
# Per seed, a dwm run of this preset's model and batch (the run's steps and update cadence) learns
# the weighting model; it is exported as `mixer export JOB --what weighting-model` writes it, and the
# run's own model trains with it from step 0, frozen (--set dwm-transfer.frozen=false keeps learning).
TRANSFER_SOURCE = "quick"


@dataclass(frozen=True)
class QualityConfig:
    """Model and schedule of every run; the presets are `quick`, `cpu` and `gpu` (~125M)."""

    layers: int
    hidden: int
    heads: int
    seq: int
    batch: int
    steps: int
    lr: float  # peak; warm-up over 10% of the steps, cosine to lr / 10
    eval_samples: int  # validation windows per domain (the first ones of each domain's set)
    update_every: int = 10  # steps per strategy update window
    eval_points: int = 10  # balanced evaluations along the run (Aioli evaluates more often)

    @property
    def compare_block(self) -> int:  # uniform: alternate detached / attached blocks of this many steps
        return max(5, min(50, self.steps // 20))

    @property
    def baseline_steps(self) -> int:  # the detached static run timed before each other strategy
        return max(20, min(40, self.steps // 20))


PRESETS = {
    # a smoke test: seconds per run on the 2-core dev machine
    "quick": QualityConfig(
        layers=2, hidden=64, heads=4, seq=64, batch=16, steps=40, lr=2e-3, eval_samples=8, update_every=5
    ),
    # mixing-calibration.md's CPU model: ~180 ms/step through megatron-core on the idle 2-core machine
    # (plain PyTorch: 165 ms); all 10 strategies x 800 steps, probes and evaluations: 28.7 minutes measured
    "cpu": QualityConfig(
        layers=3, hidden=128, heads=4, seq=128, batch=32, steps=800, lr=2e-3, eval_samples=64
    ),
    # ~125M parameters (12 x 768), bf16 on one GPU; 16k tokens a step, 400 steps ~ 1/3 pass over minipile
    # (mixer/bench/quality_gpu.sh: uniform, odm, doremi in ~10 minutes on one H100, estimated)
    "gpu": QualityConfig(
        layers=12, hidden=768, heads=12, seq=1024, batch=16, steps=400, lr=6e-4, eval_samples=64
    ),
}


@dataclass
class QualityRun:
    """What one `mixer bench quality` run compares; its options are generated from this (mixer.config)."""

    corpus: Path | None = setting(
        None,
        exists=True,
        default_text="the bundled minipile, mixer/bench/minipile: 8 domains, see its README.md",
        help="folder of <domain>/{train,val}.jsonl[.gz]",
    )
    strategies: str | None = setting(
        None,
        default_text=f"all; --quick: {','.join(QUICK_STRATEGIES)}",
        help=f"comma-separated, from {','.join(STRATEGIES)}; uniform always runs (the baseline, and the "
        "reference model of DoReMi and token-reference)",
    )
    steps: int | None = setting(None, min=2, default_text="the preset's", help="steps per run")
    seeds: int = setting(1, min=1, help="seeds 0..S-1 per strategy")
    device: str = setting("cpu", help="cpu or cuda")
    quick: bool = setting(False, help="smoke test: tiny model, few steps, three strategies")
    size: str | None = setting(
        None,
        choices=tuple(sorted(PRESETS)),
        default_text="quick with --quick, gpu with --device cuda, else cpu",
        help="model preset",
    )
    eval_samples: int | None = setting(
        None, min=1, default_text="the preset's", help="validation windows per domain"
    )
    noise_domains: int = setting(
        0,
        min=0,
        help="add N unlearnable control domains (random printable ASCII, as large as the median domain): "
        "trained on, left out of the score; a good strategy starves them",
    )
    out: Path = setting(
        Path("mixer-bench-quality"), help="result folder (result.json, quality.png, table.md, mixer.db)"
    )
    cache_dir: Path | None = setting(None, default_text="OUT/prepared", help="prepared corpus cache")
    agent: Path | None = setting(
        None,
        exists=True,
        help="a trained Data Mixing Agent (`mixer agent train --out`): adds strategy agent to the default list",
    )

    @property
    def preset_name(self) -> str:
        return self.size or ("quick" if self.quick else "gpu" if self.device.startswith("cuda") else "cpu")

    def model(self) -> QualityConfig:
        """The preset, with --steps and --eval-samples where given."""
        cfg = PRESETS[self.preset_name]
        return replace(cfg, steps=self.steps or cfg.steps, eval_samples=self.eval_samples or cfg.eval_samples)

    def strategy_names(self) -> list[str]:
        names = [s.strip() for s in (self.strategies or "").split(",") if s.strip()]
        everything = [
            s for s in STRATEGIES if s not in NEEDS_INPUT or (s == "agent" and self.agent is not None)
        ]
        return names or list(QUICK_STRATEGIES if self.quick else everything)

    def validate(self) -> None:
        names = self.strategy_names()
        unknown = sorted(set(names) - set(STRATEGIES))
        if unknown:
            raise ValueError(
                f"strategies (--strategies): unknown strategy {unknown[0]!r}; choose from {', '.join(STRATEGIES)}"
            )
        if "agent" in names and self.agent is None:
            raise ValueError("strategy agent needs --agent PATH (a folder written by `mixer agent train`)")

    def command_line(self, corpus: Path, sets: tuple[str, ...]) -> str:
        """The command that reproduces this run, every choice spelled out."""
        cfg = self.model()
        parts = [
            "mixer bench quality",
            *(["--quick"] if self.quick else []),
            f"--corpus {corpus}",
            f"--strategies {','.join(self.strategy_names())}",
            f"--steps {cfg.steps}",
            f"--seeds {self.seeds}",
            f"--eval-samples {cfg.eval_samples}",
            f"--device {self.device}",
            f"--size {self.preset_name}",
            *([f"--noise-domains {self.noise_domains}"] if self.noise_domains else []),
            *(f"--set {s}" for s in sets),
            f"--out {self.out}",
            *([f"--agent {self.agent}"] if self.agent is not None else []),
        ]
        return " ".join(parts)


def _settings(name: str, cfg: QualityConfig, K: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(strategy, weighting) of a benchmark strategy: the method's parameters scaled to this run."""
    steps, every, none = cfg.steps, cfg.update_every, {"name": "none"}
    table: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
        "uniform": ("static", {}, none),
        "natural": ("static", {}, none),  # prior weights = training tokens (bytes) per domain
        # eta 0.1: eta 1 swung hard and hurt this small model (mixing-calibration.md)
        "doremi": ("doremi", {"eta": 0.1}, none),  # paper mode: sample the prior, loss weights alpha/q
        "doremi-online": ("doremi", {"eta": 0.1, "mode": "online"}, none),  # sample from alpha
        "odm": ("odm", {"alpha": 0.9}, none),
        # the paper's warm-up / refit cadence (500 / 1000 steps) scaled to the run
        "ado": (
            "ado",
            {"warmup_steps": max(every, steps // 10), "refit_every": max(every, steps // 10)},
            none,
        ),
        # one probe round of K segments, then exploit until the next round; several rounds per run
        "aioli": (
            "aioli",
            {"lp_rounds": 1, "lp_steps": every, "update_steps": max(4 * K * every, steps // 3)},
            none,
        ),
        "dga": ("dga", {}, none),
        # topics from `mixer topics build` over every domain; stage 2 at the reference's 7/8 of the run
        "toremi": ("toremi", {"total_steps": steps, "num_topics": TOPICS_K}, {"name": "topic"}),
        # Sow et al. LinUpper on a static uniform mixture, 10% burn-in
        "loss-linupper": (
            "static",
            {},
            {"name": "loss", "params": {"method": "linupper", "burn_in": steps // 10}},
        ),
        # PRESENCE on a static uniform mixture: favour high self-influence for the first half, then damp it
        "presence": (
            "static",
            {},
            {"name": "presence", "params": {"switch_step": steps // 2, "normalize": "mean"}},
        ),
        # a trained Data Mixing Agent (its parameters come from --agent PATH): re-weights at every validation
        "agent": ("agent", {}, none),
        # token-level weighting on a static uniform mixture: TLDR, and PRIOR against uniform's checkpoint
        "token-loss": ("static", {}, {"name": "token-loss"}),
        "token-reference": ("static", {}, {"name": "token-reference"}),
        "dwm": ("dwm", {}, {"name": "dwm", "params": {"total_steps": steps, "seq_len": cfg.seq}}),
        # init_from: the model TRANSFER_SOURCE's dwm run learned (or --set dwm-transfer.init_from=FILE)
        "dwm-transfer": (
            "dwm",
            {},
            {"name": "dwm", "params": {"total_steps": steps, "seq_len": cfg.seq, "frozen": True}},
        ),
    }
    strategy, params, weighting = table[name]
    return {"name": strategy, "params": dict(params)}, weighting


def job_spec(
    name: str,
    job: str,
    seed: int,
    prefixes: dict[str, str],
    tokens: dict[str, int],
    cfg: QualityConfig,
    overrides: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """The job spec of one benchmark run; --set overrides the strategy's parameters, and with DWM
    weighting the weighting model's (DwmParams: hidden, lr, init_from, frozen, ...)."""
    strategy, weighting = _settings(name, cfg, len(prefixes))
    given = dict(overrides.get(name, {}))
    if weighting["name"] == "dwm":
        weighting["params"].update({k: given.pop(k) for k in sorted(DwmParams.NAMES & set(given))})
        if weighting["params"].get("init_from"):  # a file: the spec is read from OUT/specs
            weighting["params"]["init_from"] = str(Path(weighting["params"]["init_from"]).resolve())
    strategy["params"].update(given)
    weight = {d: (tokens[d] if name == "natural" else 1.0) for d in prefixes}
    floor = 0.0 if strategy["name"] == "static" else 0.01
    return {
        "name": job,
        "seed": seed,
        "unit": "samples",
        "strategy": strategy,
        "weighting": weighting,
        "domains": [{"name": d, "prefix": p, "weight": weight[d]} for d, p in prefixes.items()],
        "cadence": {"update_every": cfg.update_every, "min_weight": floor},
    }


def checked_strategies(
    strategies: list[str], overrides: dict[str, dict[str, Any]] | None, agent: dict[str, Any] | None
) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """The strategies to run, uniform first, and the overrides with the agent's parameters."""
    unknown = sorted(set(strategies) - set(STRATEGIES))
    if unknown:
        raise ValueError(f"unknown strategy {unknown[0]!r}; choose from {', '.join(STRATEGIES)}")
    overrides = dict(overrides or {})
    check_overrides(overrides)
    if "agent" in strategies:
        if agent is None:
            raise ValueError("strategy agent needs --agent PATH (a folder written by `mixer agent train`)")
        overrides["agent"] = {**agent, **overrides.get("agent", {})}
    # uniform is the baseline of every comparison (and DoReMi's reference): always run, first.
    return ["uniform"] + [s for s in dict.fromkeys(strategies) if s != "uniform"], overrides


def check_overrides(overrides: dict[str, dict[str, Any]]) -> None:
    """Refuse, before anything runs, an override of no known strategy, and a weighting model
    (`--set dwm.init_from=FILE`, `--set dwm-transfer.init_from=FILE`) that is no file."""
    for name, params in overrides.items():
        if name not in STRATEGIES:
            raise ValueError(
                f"--set {name}.*: unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}"
            )
        init = params.get("init_from") if name in ("dwm", "dwm-transfer") else None
        try:
            missing = init is not None and not (isinstance(init, str) and Path(init).is_file())
        except OSError:  # a name the file system refuses
            missing = True
        if missing:
            raise ValueError(
                f"--set {name}.init_from={init}: no such file; give a weighting model "
                "(`mixer export JOB --what weighting-model -o FILE`)"
            )
        if name == "dwm" and params.get("frozen") is True and init is None:
            raise ValueError(
                "--set dwm.frozen=true needs --set dwm.init_from=FILE: a frozen model must come from somewhere"
            )
