"""Data-mixing trajectories and the reinforcement-learning transitions made from them (pure: numpy only).

Data Mixing Agent (Yang et al. 2025, arXiv:2507.15640) collects many data-mixing trajectories on a
small proxy model: each is T re-weighting steps of a fixed budget whose domain distributions are
drawn at random, with the evaluation environment's feedback after every step. The paper draws them
at random over the domain space; the sampling scheme here is ours, chosen so that trajectories cover
the simplex and still move smoothly as a schedule would:

    a_0 ~ Dirichlet(alpha0 * 1)                                   (alpha0 = 1: uniform on the simplex)
    a_t ~ Dirichlet(kappa * K * ((1 - mix) a_{t-1} + mix / K))    (a random walk around the last step)

with kappa the walk's concentration (larger: smaller moves) and mix = 0.1 keeping every domain
reachable; components are floored at 1e-6 and renormalised (a Dirichlet density needs the open simplex).

Transitions (the MDP of mixer/strategies/agent.py): after evaluation e_t (t = 1..T-1) the agent is in
state s_t, takes the action a_t (the distribution actually applied during step t + 1), and earns

    r_t = reward_scale * (mean_k l_{t,k} - mean_k l_{t+1,k}),   l = e / mean(e_1)

the fall of the balanced (domain-averaged) validation loss over the step, relative to the run's
first evaluation (ours: the paper's reward is the change in its benchmarks' performance; a mean over
domains keeps source and target domains in balance as its average over MMLU and MATH does). The
mean runs over the domains the target run is scored on: `reward_ignore` leaves domains out of it
(a benchmark's unscored control domains; their losses stay in the state). The last transition of a
trajectory is terminal.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from mixer.strategies.agent import MAX_HISTORY, state_features

TRAJECTORY_FORMAT = "mixer.agent.trajectory/1"
WALK_MIX = 0.1
MIN_COMPONENT = 1e-6


class TrajectoryError(ValueError):
    """Recorded trajectories that cannot be trained on; the message names the file or field."""


def sample_schedule(
    K: int, T: int, rng: np.random.Generator, *, alpha0: float = 1.0, kappa: float = 10.0
) -> np.ndarray:
    """T domain distributions (T x K) drawn by the scheme in the module docstring."""
    if K < 2 or T < 2:
        raise ValueError(f"a trajectory needs K >= 2 domains and T >= 2 steps, got K={K}, T={T}")
    if not (0 < alpha0 <= 1e3 and 0 < kappa <= 1e4):
        raise ValueError(f"alpha0 must lie in (0, 1000] and kappa in (0, 10000], got {alpha0}, {kappa}")
    out = np.empty((T, K))
    a = rng.dirichlet(np.full(K, alpha0))
    for t in range(T):
        if t:
            a = rng.dirichlet(kappa * K * ((1 - WALK_MIX) * out[t - 1] + WALK_MIX / K))
        a = np.maximum(a, MIN_COMPONENT)
        out[t] = a / a.sum()
    return out


@dataclass(frozen=True, slots=True)
class Trajectory:
    """One recorded proxy run: the applied distribution and the evaluation after each of its T steps."""

    job: str
    domains: tuple[str, ...]
    segment_steps: int
    actions: np.ndarray  # T x K: the mean weights applied during each step (from the job's versions)
    losses: np.ndarray  # T x K: per-domain validation loss after each step

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Trajectory:
        if not isinstance(d, dict) or d.get("format") != TRAJECTORY_FORMAT:
            raise TrajectoryError(f"{where}: not a trajectory file (format must be {TRAJECTORY_FORMAT!r})")
        try:
            domains = tuple(d["domains"])
            actions = np.asarray(d["actions"], dtype=np.float64)
            losses = np.asarray(d["losses"], dtype=np.float64)
            seg, job = d["segment_steps"], d["job"]
        except (KeyError, TypeError, ValueError) as e:
            raise TrajectoryError(f"{where}: missing or malformed field ({e})") from None
        K = len(domains)
        if K < 2 or not all(isinstance(x, str) and x for x in domains) or len(set(domains)) != K:
            raise TrajectoryError(f"{where}: domains must be >= 2 distinct names")
        if (
            actions.ndim != 2
            or actions.shape[1] != K
            or actions.shape[0] < 2
            or losses.shape != actions.shape
        ):
            raise TrajectoryError(
                f"{where}: actions and losses must both be T x {K} with T >= 2, "
                f"got {actions.shape} and {losses.shape}"
            )
        if (
            not np.isfinite(actions).all()
            or (actions < 0).any()
            or not np.allclose(actions.sum(1), 1.0, atol=1e-6)
        ):
            raise TrajectoryError(f"{where}: every action must be a distribution over the {K} domains")
        if not np.isfinite(losses).all() or (losses <= 0).any() or (losses > 1e6).any():
            raise TrajectoryError(f"{where}: validation losses must be finite and in (0, 1e6]")
        if isinstance(seg, bool) or not isinstance(seg, int) or seg < 1:
            raise TrajectoryError(f"{where}: segment_steps must be an integer >= 1, got {seg!r}")
        return cls(str(job), domains, seg, actions, losses)

    def to_dict(self, **extra: Any) -> dict[str, Any]:
        return {
            "format": TRAJECTORY_FORMAT,
            "job": self.job,
            "domains": list(self.domains),
            "segment_steps": self.segment_steps,
            "actions": self.actions.tolist(),
            "losses": self.losses.tolist(),
            **extra,
        }


def one_domain_space(trajectories: list[Trajectory], why: str) -> tuple[str, ...]:
    """The domains every trajectory is over; TrajectoryError naming the first that differs."""
    domains = trajectories[0].domains
    for t in trajectories[1:]:
        if t.domains != domains:
            raise TrajectoryError(
                f"trajectory {t.job} is over domains {list(t.domains)}, but {trajectories[0].job} "
                f"is over {list(domains)}: {why}"
            )
    return domains


def data_hash(trajectories: list[Trajectory]) -> str:
    """sha256 over what training reads (domains, actions, losses), in job order: names the training data."""
    h = hashlib.sha256()
    for t in sorted(trajectories, key=lambda t: t.job):
        h.update(json.dumps([t.job, list(t.domains), t.segment_steps], separators=(",", ":")).encode())
        h.update(np.ascontiguousarray(t.actions, dtype="<f8").tobytes())
        h.update(np.ascontiguousarray(t.losses, dtype="<f8").tobytes())
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class Transitions:
    """(s, a, r, s', done) arrays of every trajectory, in float32."""

    s: np.ndarray
    a: np.ndarray
    r: np.ndarray
    s2: np.ndarray
    done: np.ndarray

    def __len__(self) -> int:
        return int(self.r.shape[0])


def transitions(
    trajectories: list[Trajectory],
    *,
    history: int,
    horizon: int,
    reward_scale: float = 100.0,
    reward_ignore: tuple[str, ...] = (),
) -> Transitions:
    """The MDP transitions of the module docstring; all trajectories must share one domain space.
    reward_ignore: domains left out of the reward's mean (a benchmark's unscored control domains);
    they stay in the state."""
    if not trajectories:
        raise TrajectoryError("no trajectories to train on (run `mixer agent collect` first)")
    if not 1 <= history <= MAX_HISTORY:
        raise TrajectoryError(f"history must lie in [1, {MAX_HISTORY}], got {history}")
    domains = one_domain_space(trajectories, "one agent learns one domain space")
    unknown = sorted(set(reward_ignore) - set(domains))
    if unknown:
        raise TrajectoryError(
            f"reward_ignore names {unknown[0]!r}, not a domain of the trajectories ({', '.join(domains)})"
        )
    scored = [k for k, d in enumerate(domains) if d not in reward_ignore]
    if not scored:
        raise TrajectoryError(f"reward_ignore leaves no domain to reward ({', '.join(domains)})")
    S, A, R, S2, D = [], [], [], [], []
    for tr in trajectories:
        T = tr.actions.shape[0]
        rel = tr.losses[:, scored] / float(tr.losses[0].mean())

        for t in range(1, T):
            S.append(_state(tr, t, history, horizon))
            A.append(tr.actions[t])
            R.append(reward_scale * (rel[t - 1].mean() - rel[t].mean()))
            S2.append(_state(tr, t + 1, history, horizon))
            D.append(float(t == T - 1))
    return Transitions(*(np.asarray(x, dtype=np.float32) for x in (S, A, R, S2, D)))


def _state(tr: Trajectory, t: int, history: int, horizon: int) -> np.ndarray:
    """The state after evaluation t (1-based): evaluations e_1..e_t, actions a_0..a_{t-1}, the last H of each."""
    idx = [max(0, j) for j in range(t - history, t)]
    return state_features(tr.actions[idx], tr.losses[idx], float(tr.losses[0].mean()), t, horizon)
