"""ODM: Online Data Mixing as a multi-armed bandit (Albalak, Pan, Raffel, Wang 2023,
"Efficient Online Data Mixing For Language Model Pre-Training", arXiv:2312.02406).

Each domain is an arm; the reward of a domain is its training loss (high loss = much left to
learn). With n the round and K domains (Algorithm 1 of the paper):

    eps_n     = min(1/K, sqrt(ln K / (K n)))                          (exploration rate)
    R_hat_i  <- alpha * R_hat_i + (1 - alpha) * R_i / pi_i            (importance-weighted, smoothed reward;
                                                                       only for domains seen in the round)
    pi_i      = (1 - K eps_n) * exp(eps_{n-1} R_hat_i) / sum_j exp(eps_{n-1} R_hat_j) + eps_n

Defaults follow the paper: alpha = 0.9. In the service one bandit update happens per update
window: R_i is the token-mean loss of domain i over the window (the paper's mixed-minibatch form
gives each domain in the batch its own loss as reward). n counts training steps, as Algorithm 1
runs one round per step: eps_n decays with the step, not with the number of windows (counting
windows would keep exploring `update_every` times longer; ours: the reward of a window stands
for its steps, one update at its last step).

Two variants reproduce the authors' released updaters (alon-albalak/online-data-mixing @ edbfdad,
`megatron/data/data_sampling_utils.py`; checked against tests/conformance/odm.json):
- variant="exp3": `Exp3WeightUpdater`: the reward is a running *sum* R_i += r_i / pi_i (no
  smoothing); the run scripts divide rewards by 10, i.e. reward_scale = 0.1.
- variant="reference": `SmoothedMeanWeightUpdater.group_update`, which the repo README calls the
  paper's implementation but which differs from it: S_i <- alpha S_i + (1 - alpha) exp(r_i) with
  no 1/pi correction, and a *linear* policy pi = (1 - K eps_n) S / sum S + eps_n.
The reference variants count n as the global step too (warm-up included), as the released code does.
`odm_step` is the one update all three share; `policy="exp"` with `importance=False,
exp_reward=True` is the released single-domain `SmoothedMeanWeightUpdater.update`.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from mixer.errors import SpecError
from mixer.signals import DOMAIN_LOSS, Window
from mixer.strategies import register
from mixer.strategies.base import Decision, State, Strategy

VARIANTS = ("paper", "exp3", "reference")
# variant -> (smoothed reward?, importance-weighted?, exp of the reward?, policy)
_RULES = {
    "paper": (True, True, False, "exp"),
    "exp3": (False, True, False, "exp"),
    "reference": (True, False, True, "linear"),
}


def exploration_rate(K: int, n: int) -> float:
    """eps_n = min(1/K, sqrt(ln K / (K n))); 1 for a single arm."""
    if K == 1:
        return 1.0
    return min(1.0 / K, math.sqrt(math.log(K) / (K * n)))


def odm_step(
    reward: np.ndarray,
    pi: np.ndarray,
    eps: float,
    n: int,
    present: np.ndarray,
    r: np.ndarray,
    *,
    alpha: float | None,
    importance: bool,
    exp_reward: bool,
    policy: str,
) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
    """One bandit update at round n.

    `present` indexes the domains observed this round, `r` their (scaled) rewards in that order.
    alpha=None accumulates rewards (EXP3), otherwise R <- alpha R + (1 - alpha) x. Returns
    (reward estimates, new policy, new eps, raw weights before the final renormalisation).
    """
    K = reward.shape[0]
    present = np.asarray(present, dtype=np.int64)
    x = np.asarray(r, dtype=np.float64)
    if exp_reward:
        x = np.exp(x)
    if importance:
        x = x / np.maximum(pi[present], 1e-300)
    R = reward.copy()
    if alpha is None:
        R[present] += x
    else:
        R[present] = alpha * R[present] + (1.0 - alpha) * x
    prev_eps, eps = eps, exploration_rate(K, n)
    if policy == "exp":
        z = prev_eps * R
        z = np.exp(z - z.max())
        share = z / z.sum()
    else:
        total = R.sum()
        share = R / total if total > 0 else np.full(K, 1.0 / K)
    w = (1.0 - K * eps) * share + eps
    return R, w / w.sum(), eps, w


@register
class ODM(Strategy):
    name = "odm"
    signals = frozenset({DOMAIN_LOSS})
    defaults: ClassVar[dict[str, Any]] = {"alpha": 0.9, "reward_scale": 1.0, "variant": "paper"}

    def validate(self) -> None:
        self.check("alpha", 0.0 <= self.params["alpha"] < 1.0, "must lie in [0, 1)")
        self.check("reward_scale", self.params["reward_scale"] > 0, "must be > 0")
        if self.params["variant"] not in VARIANTS:
            raise SpecError(
                "strategy.params.variant", f"{self.params['variant']!r} is not one of {', '.join(VARIANTS)}"
            )

    def eps(self, t: int) -> float:
        return exploration_rate(self.K, t)

    def init(self, seed: int) -> State:
        return {
            "t": 0,
            "eps": 1.0 / self.K,
            "reward": np.zeros(self.K),
            "pi": self.prior.copy(),
        }

    def update(self, state: State, window: Window) -> tuple[State, Decision | None]:
        loss, seen = window.mean_loss()
        if not seen.any():
            return state, None
        variant = self.params["variant"]
        smoothed, importance, exp_reward, policy = _RULES[variant]
        t = state["t"] + 1
        n = window.step + 1  # rounds are training steps (Algorithm 1), for every variant
        present = np.flatnonzero(seen)
        R, pi, eps, _ = odm_step(
            state["reward"],
            state["pi"],
            state["eps"],
            n,
            present,
            loss[present] * self.params["reward_scale"],
            alpha=self.params["alpha"] if smoothed else None,
            importance=importance,
            exp_reward=exp_reward,
            policy=policy,
        )
        new = {"t": t, "eps": float(eps), "reward": R, "pi": pi}
        return new, Decision(weights=pi, params={"eps": float(eps)})
