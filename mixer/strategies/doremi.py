"""DoReMi: Group-DRO domain reweighting with clipped excess loss (Xie et al. 2023, "DoReMi:
Optimizing Data Mixtures Speeds Up Language Model Pretraining", NeurIPS 2023, arXiv:2305.10429,
Algorithm 1), in the paper's form (a proxy trained on a fixed mixture with reweighted losses) or
online (sampling from the current weights).

Per update window, for every domain i seen in it (workers send, per domain, the sum over tokens
of max(loss - reference loss, 0) and the token count):

    lambda_i = sum_tokens max(l_theta - l_ref, 0) / tokens_i        (clipped per-domain excess loss, line 6)
    alpha'   = alpha * exp(eta * lambda)                            (exponentiated-gradient step, line 7, in log space)
    alpha    = (1 - c) * alpha' / sum(alpha') + c * u               (smoothing with the uniform u, line 8)

and the running average of alpha is DoReMi's output mixture (Decision.params["avg_weights"]).
Defaults: eta = 1, c = 1e-3 (paper; the reference run script uses the same c, its dataclass 1e-4).

`mode` says what the proxy trains on:
- `paper` (default): as in Algorithm 1 and the reference trainer. Batches are sampled from a fixed
  mixture q, the spec's prior as the engine shapes it (the paper samples uniformly, the reference
  from its config's train_domain_weights; give a uniform prior for the paper's setting), so the
  served weights never move. The proxy objective sum_i alpha_i L_i (line 9) reaches the trainer as
  per-domain loss weights alpha_i / q_i in every version's params["domain_loss_weights"]; workers
  multiply each sample's loss by its domain's weight (mixer.megatron.loss). Every domain keeps its
  share q_i of every batch, so its excess loss stays current.
- `online`: workers sample from alpha itself (or its average, `output`) and the loss is unweighted.
  A domain pushed to the floor then gets almost no tokens and its excess loss goes stale.

Choices that are ours:
- Loss normalisation (paper mode). The reference divides the alpha/q-weighted token-loss sum by
  the weighted token count of the global batch (a self-normalised mean); we divide by the
  unweighted token count, as every loss here is (Sow et al.'s normalisation, which instance weights
  share). Since sum_i q_i (alpha_i / q_i) = 1, each token's expected weight is 1 and the two differ
  by the batch's mean weight, 1 in expectation; ours needs no second reduction, composes with
  instance weights, and lets Megatron normalise over micro-batches it has not seen yet.
- Timing. The reference updates alpha and weights the same step's loss with it (rank 0; other
  ranks, per its README, may use the previous step's). Here a step's excess loss reaches the service
  after the step, and the version carrying the new alpha applies from its effective step
  (cadence.delay later, or when it arrives): the loss weights lag by at least one step. Set
  cadence.update_every = 1 for the paper's update every optimizer step; with a longer window,
  lambda_i is the token mean over all of the window's reports (the reference: one step's batch).
  Before the first update workers weight every domain's loss by 1 (= alpha_0 / q for an unshaped
  prior). Every version also carries alpha_t itself as params["alpha"].
- A domain absent from the window keeps its previous lambda (as the reference does). The reference
  starts every lambda at log(vocab size), so a domain missing from the first update jumps to ~0.999
  weight; here the initial lambda is `initial_score`, default 0 ("no excess seen yet"), and
  `initial_score = log(50277)` reproduces the reference.
- `average_includes_initial` makes the average count the initial weights as the reference does
  (the paper averages t = 1..T).
- alpha starts at the spec's prior (the reference: its train_domain_weights, i.e. q).
- Paper mode refuses 0 < q_i < MIN_SAMPLING_WEIGHT, so that a loss weight stays at most 1e6; a
  domain with q_i = 0 is never drawn and gets loss weight 0.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from mixer.errors import SpecError
from mixer.shaping import shape_weights
from mixer.signals import DOMAIN_LOSS, EXCESS_LOSS, Window
from mixer.spec_defaults import LEGACY_DEFAULTS_VERSION
from mixer.strategies import register
from mixer.strategies.base import Decision, State, Strategy

OUTPUTS = ("current", "average")
MODES = ("paper", "online")
MIN_SAMPLING_WEIGHT = 1e-6
"""Smallest q_i paper mode accepts: loss weights alpha_i / q_i stay <= 1e6."""


def doremi_step(alpha: np.ndarray, excess_loss: np.ndarray, *, eta: float, c: float) -> np.ndarray:
    """alpha <- (1 - c) softmax(log alpha + eta * lambda) + c / K (Algorithm 1, lines 7-8)."""
    K = alpha.shape[0]
    with np.errstate(divide="ignore"):
        z = np.log(alpha) + eta * excess_loss
    z = np.exp(z - z.max())
    return (1.0 - c) * z / z.sum() + c / K


def loss_weights(alpha: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Per-domain loss weights alpha_i / q_i: sum_i alpha_i L_i estimated from batches drawn from q.
    A domain with q_i = 0 is never drawn; its weight is 0 (it never multiplies a loss)."""
    return np.divide(alpha, q, out=np.zeros_like(alpha), where=q > 0)


@register
class DoReMi(Strategy):
    name = "doremi"
    signals = frozenset({EXCESS_LOSS, DOMAIN_LOSS})
    defaults: ClassVar[dict[str, Any]] = {
        "mode": "paper",
        "eta": 1.0,
        "c": 1e-3,
        "initial_score": 0.0,
        "average_includes_initial": False,
        "output": "current",
    }

    @property
    def ships_loss_weights(self) -> bool:
        """Versions carry params["domain_loss_weights"] that the trainer's loss applies."""
        return self.params["mode"] == "paper"

    def validate(self) -> None:
        self.check("eta", self.params["eta"] > 0, "must be > 0")
        self.check("c", 0.0 <= self.params["c"] <= 1.0, "must lie in [0, 1]")
        self.check(
            "initial_score",
            self.params["initial_score"] >= 0,
            "must be >= 0 (excess losses are clipped at 0)",
        )
        mode = self.params["mode"]
        if mode not in MODES:
            raise SpecError("strategy.params.mode", f"{mode!r} is not one of {', '.join(MODES)}")
        if self.params["output"] not in OUTPUTS:
            raise SpecError(
                "strategy.params.output", f"{self.params['output']!r} is not one of {', '.join(OUTPUTS)}"
            )
        if mode == "paper" and self.params["output"] != self.defaults["output"]:
            raise SpecError(
                "strategy.params.output",
                "applies to mode online only: in mode paper workers sample from the fixed prior",
            )
        if mode == "paper":
            q = self.sampling_weights()
            low = int(np.argmin(np.where(q > 0, q, np.inf)))
            if 0 < q[low] < MIN_SAMPLING_WEIGHT:
                raise SpecError(
                    f"domains[{low}].weight",
                    f"DoReMi's mode paper samples every domain from the prior and weights its loss by "
                    f"alpha/q; domain {self.spec.domain_names[low]!r} has q = {q[low]:.3g} "
                    f"(after the cadence's floor, cap and smoothing), below {MIN_SAMPLING_WEIGHT:g}: "
                    "raise its weight or use mode online",
                )

    def sampling_weights(self) -> np.ndarray:
        """q: the prior as the engine serves it (floor, cap, prior smoothing applied)."""
        return shape_weights(self.prior, self.prior, self.spec.cadence)

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
        params = {"alpha": alpha.tolist(), "avg_weights": avg.tolist(), "excess_loss": excess_loss.tolist()}
        if self.spec.defaults_version == LEGACY_DEFAULTS_VERSION:
            del params["alpha"]  # versions of specs stored before paper mode existed did not carry it
        if self.params["mode"] == "paper":
            q = self.sampling_weights()
            params["domain_loss_weights"] = loss_weights(alpha, q).tolist()
            # The prior itself: the engine shapes it into exactly q (shaping q again could move it).
            return new, Decision(weights=self.prior.copy(), params=params)
        weights = alpha if self.params["output"] == "current" else avg
        return new, Decision(weights=weights, params=params)
