"""DoReMi, online form: Group-DRO domain reweighting with clipped excess loss (Xie et al. 2023,
"DoReMi: Optimizing Data Mixtures Speeds Up Language Model Pretraining", NeurIPS 2023,
arXiv:2305.10429, Algorithm 1).

Per update window, for every domain i seen in it (workers send, per domain, the sum over tokens
of max(loss - reference loss, 0) and the token count):

    lambda_i = sum_tokens max(l_theta - l_ref, 0) / tokens_i        (clipped per-domain excess loss)
    alpha'   = alpha * exp(eta * lambda)                            (exponentiated-gradient step, in log space)
    alpha    = (1 - c) * alpha' / sum(alpha') + c * u               (smoothing with the uniform u)

and the running average of alpha is DoReMi's final mixture (Decision.params["avg_weights"]).
Defaults: eta = 1, c = 1e-3 (paper; the reference run script uses the same c, its dataclass 1e-4).

A domain absent from the window keeps its previous lambda (as the reference code does). The
reference starts every lambda at log(vocab size), so a domain missing from the first update jumps
to ~0.999 weight; here the initial lambda is the parameter `initial_score`, default 0 ("no excess
seen yet"), and `initial_score = log(50277)` reproduces the reference. `average_includes_initial`
makes the average count the initial weights as the reference does (the paper averages t = 1..T).
`output` chooses what workers sample from: the current alpha_t (online DoReMi) or the average.
"""

from __future__ import annotations

import numpy as np

from mixer.signals import DOMAIN_LOSS, EXCESS_LOSS, Window
from mixer.spec import SpecError
from mixer.strategies import register
from mixer.strategies.base import Decision, State, Strategy

OUTPUTS = ("current", "average")


def doremi_step(alpha: np.ndarray, excess_loss: np.ndarray, *, eta: float, c: float) -> np.ndarray:
    """alpha <- (1 - c) softmax(log alpha + eta * lambda) + c / K (Algorithm 1, lines 7-8)."""
    K = alpha.shape[0]
    with np.errstate(divide="ignore"):
        z = np.log(alpha) + eta * excess_loss
    z = np.exp(z - z.max())
    return (1.0 - c) * z / z.sum() + c / K


@register
class DoReMi(Strategy):
    name = "doremi"
    signals = frozenset({EXCESS_LOSS, DOMAIN_LOSS})
    defaults = {
        "eta": 1.0,
        "c": 1e-3,
        "initial_score": 0.0,
        "average_includes_initial": False,
        "output": "current",
    }

    def validate(self) -> None:
        self.check("eta", self.params["eta"] > 0, "must be > 0")
        self.check("c", 0.0 <= self.params["c"] <= 1.0, "must lie in [0, 1]")
        self.check(
            "initial_score",
            self.params["initial_score"] >= 0,
            "must be >= 0 (excess losses are clipped at 0)",
        )
        if self.params["output"] not in OUTPUTS:
            raise SpecError(
                "strategy.params.output", f"{self.params['output']!r} is not one of {', '.join(OUTPUTS)}"
            )

    def init(self, seed: int) -> State:
        include = self.params["average_includes_initial"]
        return {
            "alpha": self.prior.copy(),
            "excess_loss": np.full(self.K, self.params["initial_score"]),
            "avg_sum": self.prior.copy() if include else np.zeros(self.K),
            "avg_count": 1 if include else 0,
        }

    def update(self, state: State, window: Window) -> tuple[State, Decision | None]:
        excess_sum, tokens = np.zeros(self.K), np.zeros(self.K)
        for r in window.reports:
            # Only tokens that came with an excess measurement count in the denominator.
            if r.excess_loss_sum is not None and r.domain_token_count is not None:
                excess_sum += r.excess_loss_sum
                tokens += r.domain_token_count
        seen = tokens > 0
        if not seen.any():
            return state, None
        excess_loss = state["excess_loss"].copy()
        excess_loss[seen] = excess_sum[seen] / tokens[seen]
        alpha = doremi_step(state["alpha"], excess_loss, eta=self.params["eta"], c=self.params["c"])
        avg_sum = state["avg_sum"] + alpha
        avg_count = state["avg_count"] + 1
        avg = avg_sum / avg_count
        new = {"alpha": alpha, "excess_loss": excess_loss, "avg_sum": avg_sum, "avg_count": avg_count}
        weights = alpha if self.params["output"] == "current" else avg
        params = {"avg_weights": avg.tolist(), "excess_loss": excess_loss.tolist()}
        return new, Decision(weights=weights, params=params)
