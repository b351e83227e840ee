"""ODM: Online Data Mixing as a multi-armed bandit (Albalak, Pan, Raffel, Wang 2023,
"Efficient Online Data Mixing For Language Model Pre-Training", arXiv:2312.02406).

Each domain is an arm; the reward of a domain is its training loss (high loss = much left to
learn). With t the update round and K domains (Algorithm 1 of the paper):

    eps_t     = min(1/K, sqrt(ln K / (K t)))                          (exploration rate)
    R_hat_i  <- alpha * R_hat_i + (1 - alpha) * R_i / pi_i            (importance-weighted, smoothed reward;
                                                                       only for domains seen in the round)
    pi_i      = (1 - K eps_t) * exp(eps_{t-1} R_hat_i) / sum_j exp(eps_{t-1} R_hat_j) + eps_t

Defaults follow the paper: alpha = 0.9. In the service one round is one update window: R_i is
the token-mean loss of domain i over the window (the paper's mixed-minibatch form gives each
domain in the batch its own loss as reward).

variant="reference" reproduces the authors' released `SmoothedMeanWeightUpdater.group_update`,
which differs from the paper: S_i <- alpha S_i + (1 - alpha) exp(R_i) with no 1/pi correction,
and a linear policy pi = (1 - K eps_t) S / sum S + eps_t. `reward_scale` multiplies rewards
(the released EXP3 path divides rewards by 10, i.e. reward_scale = 0.1).
"""

from __future__ import annotations

import math

import numpy as np

from mixer.signals import DOMAIN_LOSS, Window
from mixer.strategies import register
from mixer.strategies.base import Decision, State, Strategy
from mixer.spec import SpecError

VARIANTS = ("paper", "reference")


@register
class ODM(Strategy):
    name = "odm"
    signals = frozenset({DOMAIN_LOSS})
    defaults = {"alpha": 0.9, "reward_scale": 1.0, "variant": "paper"}

    def validate(self) -> None:
        self.check("alpha", 0.0 <= self.params["alpha"] < 1.0, "must lie in [0, 1)")
        self.check("reward_scale", self.params["reward_scale"] > 0, "must be > 0")
        if self.params["variant"] not in VARIANTS:
            raise SpecError("strategy.params.variant", f"{self.params['variant']!r} is not one of {', '.join(VARIANTS)}")

    def eps(self, t: int) -> float:
        K = self.K
        if K == 1:
            return 1.0
        return min(1.0 / K, math.sqrt(math.log(K) / (K * t)))

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
        K, alpha = self.K, self.params["alpha"]
        r = loss * self.params["reward_scale"]
        t = state["t"] + 1
        prev_eps, eps = state["eps"], self.eps(t)
        R = state["reward"].copy()
        if self.params["variant"] == "paper":
            pi = state["pi"]
            R[seen] = alpha * R[seen] + (1.0 - alpha) * r[seen] / np.maximum(pi[seen], 1e-12)
            z = prev_eps * R
            z = np.exp(z - z.max())
            new_pi = (1.0 - K * eps) * z / z.sum() + eps
        else:
            R[seen] = alpha * R[seen] + (1.0 - alpha) * np.exp(r[seen])
            new_pi = (1.0 - K * eps) * R / R.sum() + eps
        new_pi = new_pi / new_pi.sum()
        new = {"t": t, "eps": eps, "reward": R, "pi": new_pi}
        return new, Decision(weights=new_pi, params={"eps": eps})
