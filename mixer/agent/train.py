"""Train the Data Mixing Agent offline by conservative Q-learning (Yang et al. 2025, arXiv:2507.15640).

The paper trains its agent on the recorded trajectories with Conservative Q-Learning (Kumar, Zhou,
Tucker, Levine, NeurIPS 2020, "Conservative Q-Learning for Offline Reinforcement Learning"), after
a supervised warm start, because fresh trajectories cannot be sampled during training. We follow
CQL's actor-critic form for continuous actions (the CQL(H) variant of its eq. 4 on top of SAC, and
the authors' reference code, where the first `bc_steps` policy updates are behaviour cloning):

    critic:  L(theta) = E_D[(Q(s,a) - y)^2] + alpha * E_s[log sum_j exp(Q(s,a_j) - log mu(a_j)) - log 3N - E_D Q(s,a)]
             y = r + gamma (1 - done) min_i Q'_i(s', a'),  a' ~ pi(.|s')
    actor:   L(phi) = E_s[beta log pi(a~|s) - min_i Q_i(s, a~)],  a~ ~ pi(.|s)   (reparameterised)
             the first bc_steps updates: E_D[beta log pi(a~|s) - log pi(a|s)]  (behaviour cloning)

with two critics and Polyak-averaged targets (tau), the a_j of the log-sum-exp drawn N at a time from
the uniform density on the simplex (Dirichlet(1)), from pi(.|s) and from pi(.|s') with their
importance weights mu (CQL's appendix F estimator), and no entropy term in the target (the reference
code's `backup_entropy: False`). The defaults are the reference code's (gamma 0.99, tau 0.005,
alpha 5, N = 10, learning rates 3e-4 critic / 1e-4 actor); ours: the policy is a Dirichlet over the
simplex (the action space is a distribution over domains) with mean softmax(z(s)) and concentration
K * c, c in [1, 1000] learned per state; beta = 1e-3 (a Dirichlet's log density on the simplex is
not on the scale of a Gaussian's); the networks (two tanh layers of `hidden` units, shared by actor
and critics; actor and critic layout in mixer/strategies/agent.py); batch 256; the steps.

Outputs (folder): agent.safetensors (actor, critics and targets, float32; the header's metadata names
the domains, history, horizon and data hash, the same layout the `agent` strategy reads),
actor.safetensors (the actor alone with the same metadata: the file a job spec names by its sha256),
and agent.json (the card: the inputs it expects, the domains, the training data's hash and size, the
hyperparameters and the loss curve).
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mixer.agent.trajectory import Trajectory, TrajectoryError, data_hash, transitions
from mixer.strategies.agent import ACTOR_KEYS, FORMAT, MAX_HISTORY, num_features

__all__ = ["TrainConfig", "train", "train_on"]

CARD = "agent.json"
WEIGHTS = "agent.safetensors"
ACTOR = "actor.safetensors"
"""The actor alone: the file a job spec names by its sha256 (the policy; the critics stay in WEIGHTS)."""


@dataclass(kw_only=True)
class TrainConfig:
    """CQL hyperparameters (see the module docstring for whose they are)."""

    steps: int = 3000
    bc_steps: int = 500
    batch: int = 256
    history: int = 2
    hidden: int = 64
    gamma: float = 0.99
    tau: float = 0.005
    alpha: float = 5.0
    """CQL's weight of the conservative term."""
    beta: float = 1e-3
    """Weight of the policy's log density in the actor loss."""
    num_actions: int = 10
    actor_lr: float = 1e-4
    critic_lr: float = 3e-4
    reward_scale: float = 100.0
    horizon: int = 0
    """Re-weighting steps of a whole run, for the progress input (0: the trajectories' T)."""
    reward_ignore: tuple[str, ...] = ()
    """Domains left out of the reward's mean (e.g. unscored control domains); they stay in the state."""
    seed: int = 0

    def validate(self) -> TrainConfig:
        def integer(name: str, lo: int, hi: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {v!r}")

        def number(name: str, lo: float, hi: float, open_lo: bool = False) -> None:
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if not ok or v > hi or v < lo or (open_lo and v == lo):
                raise ValueError(
                    f"{name} must be a number in {'(' if open_lo else '['}{lo}, {hi}], got {v!r}"
                )

        integer("steps", 1, 10_000_000)
        integer("bc_steps", 0, self.steps)
        integer("batch", 1, 1 << 16)
        integer("history", 1, MAX_HISTORY)
        integer("hidden", 1, 4096)
        integer("num_actions", 1, 1024)
        integer("horizon", 0, 1_000_000)
        integer("seed", 0, 2**63 - 1)
        number("gamma", 0.0, 1.0)
        number("tau", 0.0, 1.0, open_lo=True)
        number("alpha", 0.0, 1e4)
        number("beta", 0.0, 1e2)
        number("actor_lr", 0.0, 1.0, open_lo=True)
        number("critic_lr", 0.0, 1.0, open_lo=True)
        number("reward_scale", 0.0, 1e6, open_lo=True)
        ignore = self.reward_ignore
        if not isinstance(ignore, (tuple, list)) or not all(isinstance(d, str) and d for d in ignore):
            raise ValueError(f"reward_ignore must be a list of domain names, got {ignore!r}")
        self.reward_ignore = tuple(ignore)
        return self


def _mlp(prefix: str, sizes: list[int], gen) -> dict[str, Any]:
    """tanh MLP parameters W (in x out) and b, PyTorch's default uniform(+-1/sqrt(in)) initialisation."""
    import torch

    out = {}
    for i, (a, b) in enumerate(itertools.pairwise(sizes), start=1):
        bound = 1.0 / math.sqrt(a)
        out[f"{prefix}.W{i}"] = torch.nn.Parameter((torch.rand(a, b, generator=gen) * 2 - 1) * bound)
        out[f"{prefix}.b{i}"] = torch.nn.Parameter((torch.rand(b, generator=gen) * 2 - 1) * bound)
    return out


def _forward(p: dict[str, Any], prefix: str, x):
    import torch

    h = torch.tanh(x @ p[f"{prefix}.W1"] + p[f"{prefix}.b1"])
    h = torch.tanh(h @ p[f"{prefix}.W2"] + p[f"{prefix}.b2"])
    return h @ p[f"{prefix}.W3"] + p[f"{prefix}.b3"]


class _Agent:
    """Actor (Dirichlet policy) and twin critics with targets, as plain tensors."""

    def __init__(self, K: int, F: int, hidden: int, gen):
        import torch

        self.K = K
        # the concentration head is one linear layer (actor_c.W1, actor_c.b1)
        self.p = {**_mlp("actor", [F, hidden, hidden, K], gen), **_mlp("actor_c", [F, 1], gen)}
        for q in ("q1", "q2"):
            self.p.update(_mlp(q, [F + K, hidden, hidden, 1], gen))
        for q in ("q1", "q2"):
            for k in [k for k in self.p if k.startswith(q + ".")]:
                self.p["target_" + k] = torch.nn.Parameter(self.p[k].detach().clone(), requires_grad=False)

    def actor_params(self) -> list[Any]:
        return [v for k, v in self.p.items() if k.startswith("actor")]

    def critic_params(self) -> list[Any]:
        return [v for k, v in self.p.items() if k.startswith(("q1.", "q2."))]

    def policy(self, s):
        import torch

        mean = torch.softmax(_forward(self.p, "actor", s), dim=-1)
        # in [1, 1000], about 8 at initialisation: a broad policy, so behaviour cloning starts from finite losses
        c = 1.0 + 999.0 * torch.sigmoid(s @ self.p["actor_c.W1"] + self.p["actor_c.b1"] - 5.0)
        return torch.distributions.Dirichlet(self.K * c * mean + 1e-4)

    def q(self, name: str, s, a):
        import torch

        return _forward(self.p, name, torch.cat([s, a], dim=-1)).squeeze(-1)


def _safe(a):
    a = a.clamp_min(1e-6)
    return a / a.sum(-1, keepdim=True)


def train_on(
    trajectories: list[Trajectory], config: TrainConfig | None = None, *, progress: bool = True
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """CQL on the trajectories' transitions; returns (tensors, card) without writing anything."""
    import torch

    cfg = (config or TrainConfig()).validate()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these matrices are small: more threads only contend (and reorder sums)
    try:
        return _train_on(trajectories, cfg, progress)
    finally:
        torch.set_num_threads(threads)


@dataclass(slots=True)
class _Batch:
    """One minibatch of transitions (torch tensors)."""

    s: Any
    a: Any
    r: Any
    s2: Any
    done: Any


def _train_on(
    trajectories: list[Trajectory], cfg: TrainConfig, progress: bool
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    import torch
    from tqdm import tqdm

    if not trajectories:
        raise TrajectoryError("no trajectories to train on (run `mixer agent collect` first)")
    horizon = cfg.horizon or max(t.actions.shape[0] for t in trajectories)
    data = transitions(
        trajectories,
        history=cfg.history,
        horizon=horizon,
        reward_scale=cfg.reward_scale,
        reward_ignore=cfg.reward_ignore,
    )
    domains = list(trajectories[0].domains)
    K, F = len(domains), num_features(len(domains), cfg.history)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # Dirichlet sampling draws from the global generator
    agent = _Agent(K, F, cfg.hidden, gen)
    actor_opt = torch.optim.Adam(agent.actor_params(), lr=cfg.actor_lr)
    critic_opt = torch.optim.Adam(agent.critic_params(), lr=cfg.critic_lr)
    S, A, R, S2, D = (torch.from_numpy(x) for x in (data.s, data.a, data.r, data.s2, data.done))
    A = _safe(A)
    n = len(data)
    history: list[dict[str, float]] = []
    every = max(1, cfg.steps // 50)
    bar = tqdm(range(cfg.steps), desc="agent train (CQL)", unit="step", disable=not progress)
    for step in bar:
        idx = torch.randint(0, n, (min(cfg.batch, n),), generator=gen)
        batch = _Batch(S[idx], A[idx], R[idx], S2[idx], D[idx])
        td, cql = _critic_step(agent, critic_opt, batch, cfg)
        actor_loss, bc_nll = _actor_step(agent, actor_opt, batch, cfg, behaviour_cloning=step < cfg.bc_steps)
        _polyak(agent, cfg.tau)
        if step % every == 0 or step == cfg.steps - 1:
            row = {"step": step, "td": td, "cql": cql, "actor": actor_loss, "bc_nll": bc_nll}
            if not all(math.isfinite(v) for v in row.values()):
                raise FloatingPointError(f"training diverged at step {step}: {row}")
            history.append(row)
            bar.set_postfix(td=f"{td:.3g}", bc_nll=f"{bc_nll:.3g}")
    bar.close()
    tensors = {k: v.detach().numpy().astype(np.float32).copy() for k, v in agent.p.items()}
    return tensors, _card(trajectories, cfg, domains, horizon, n, history)


def _critic_step(agent: _Agent, opt: Any, b: _Batch, cfg: TrainConfig) -> tuple[float, float]:
    """One update of both critics (TD + CQL's conservative term); returns their mean td and cql losses."""
    import torch

    B, F, N = b.s.shape[0], b.s.shape[1], cfg.num_actions
    log_mu_uniform = math.lgamma(agent.K)  # log density of Dirichlet(1) on the simplex
    with torch.no_grad():
        pi2 = agent.policy(b.s2)
        a2 = _safe(pi2.sample())
        q_next = torch.minimum(agent.q("target_q1", b.s2, a2), agent.q("target_q2", b.s2, a2))
        y = b.r + cfg.gamma * (1.0 - b.done) * q_next
        a_rand = torch.distributions.Dirichlet(torch.ones(agent.K)).sample((N, B))
        pi = agent.policy(b.s)
        a_cur = _safe(pi.sample((N,)))
        a_nxt = _safe(pi2.sample((N,)))
        lp_cur, lp_nxt = pi.log_prob(a_cur), pi2.log_prob(a_nxt)
    s_rep = b.s.unsqueeze(0).expand(N, B, F)
    td = cql = 0.0
    loss = 0.0
    for name in ("q1", "q2"):
        q_data = agent.q(name, b.s, b.a)
        td_i = ((q_data - y) ** 2).mean()
        cat = torch.cat(
            [
                agent.q(name, s_rep, a_rand) - log_mu_uniform,
                agent.q(name, s_rep, a_cur) - lp_cur,
                agent.q(name, s_rep, a_nxt) - lp_nxt,
            ],
            dim=0,
        )
        cql_i = (torch.logsumexp(cat, dim=0) - math.log(3 * N)).mean() - q_data.mean()
        loss = loss + td_i + cfg.alpha * cql_i
        td, cql = td + td_i.item() / 2, cql + cql_i.item() / 2
    opt.zero_grad()
    loss.backward()
    opt.step()
    return td, cql


def _actor_step(
    agent: _Agent, opt: Any, b: _Batch, cfg: TrainConfig, *, behaviour_cloning: bool
) -> tuple[float, float]:
    """One policy update (behaviour cloning during the warm start); returns (actor loss, bc nll)."""
    import torch

    pi = agent.policy(b.s)
    a_new = pi.rsample()
    logp = pi.log_prob(_safe(a_new))
    bc_nll = -pi.log_prob(b.a).mean()
    if behaviour_cloning:
        loss = cfg.beta * logp.mean() + bc_nll
    else:
        q_new = torch.minimum(agent.q("q1", b.s, _safe(a_new)), agent.q("q2", b.s, _safe(a_new)))
        loss = (cfg.beta * logp - q_new).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item(), bc_nll.item()


def _polyak(agent: _Agent, tau: float) -> None:
    """Move the target critics towards the critics by tau."""
    import torch

    with torch.no_grad():
        for q in ("q1", "q2"):
            for k in [k for k in agent.p if k.startswith(q + ".")]:
                agent.p["target_" + k].mul_(1 - tau).add_(tau * agent.p[k])


def _card(
    trajectories: list[Trajectory],
    cfg: TrainConfig,
    domains: list[str],
    horizon: int,
    n: int,
    history: list[dict[str, float]],
) -> dict[str, Any]:
    """The JSON card: what the agent expects as input, what it was trained on, and how."""
    K, F = len(domains), num_features(len(domains), cfg.history)
    return {
        "format": FORMAT,
        "method": "CQL (Kumar et al. 2020) on data-mixing trajectories (Yang et al. 2025, arXiv:2507.15640)",
        "domains": domains,
        "inputs": {
            "history": cfg.history,
            "horizon": horizon,
            "num_features": F,
            "state": [
                {
                    "name": "weights",
                    "shape": [cfg.history, K],
                    "meaning": "the last H distributions applied, oldest first",
                },
                {
                    "name": "val_loss_ratio",
                    "shape": [cfg.history, K],
                    "meaning": "the last H per-domain validation losses / mean loss of the first evaluation - 1",
                },
                {"name": "progress", "shape": [1], "meaning": "evaluations so far / horizon, at most 1"},
            ],
            "action": {"shape": [K], "meaning": "next domain weights (softmax of the actor's output)"},
            "signal": "per-domain validation loss (val_loss), one re-weighting step per evaluation",
        },
        "data": {
            "hash": data_hash(trajectories),
            "trajectories": len(trajectories),
            "transitions": n,
            "jobs": sorted(t.job for t in trajectories),
        },
        "train": asdict(cfg) | {"horizon": horizon},
        "history": history,
    }


def _metadata(card: dict[str, Any]) -> dict[str, str]:
    return {
        "format": FORMAT,
        "domains": json.dumps(card["domains"]),
        "history": str(card["inputs"]["history"]),
        "horizon": str(card["inputs"]["horizon"]),
        "data_hash": card["data"]["hash"],
    }


def actor_bytes(tensors: dict[str, np.ndarray], card: dict[str, Any]) -> bytes:
    """The actor's tensors alone as canonical safetensors with the card's metadata: ACTOR's bytes."""
    import safetensors.numpy

    from mixer.strategies.dwm import canonical_safetensors

    actor = {k: tensors[k] for k in ACTOR_KEYS}
    return canonical_safetensors(safetensors.numpy.save(actor, metadata=_metadata(card)))


def save_agent(folder: Path, tensors: dict[str, np.ndarray], card: dict[str, Any]) -> Path:
    """Write agent.safetensors, actor.safetensors and agent.json under folder (each atomically)."""
    import safetensors.numpy

    from mixer.strategies.dwm import canonical_safetensors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    blob = canonical_safetensors(
        safetensors.numpy.save(dict(sorted(tensors.items())), metadata=_metadata(card))
    )
    card_text = (json.dumps(card, indent=1) + "\n").encode()
    for name, data in ((WEIGHTS, blob), (ACTOR, actor_bytes(tensors, card)), (CARD, card_text)):
        tmp = folder / (name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(folder / name)
    return folder


def train(
    *, trajectories: Path, out: Path, config: TrainConfig | None = None, progress: bool = True
) -> dict[str, Any]:
    """Train on every trajectory under `trajectories` (the folder `collect` wrote); save to `out`.
    Returns the card."""
    from mixer.agent.collect import load_trajectories

    t0 = time.perf_counter()
    trajs = load_trajectories(Path(trajectories))
    tensors, card = train_on(trajs, config, progress=progress)
    card["wall_s"] = time.perf_counter() - t0
    save_agent(Path(out), tensors, card)
    return card
