"""Aioli: online estimation of the linear mixing-law matrix A and an exponentiated update of the
mixture (Chen, Hu, Lourie, Cho, Re, "Aioli: A Unified Optimization Framework for Language Model
Data Mixing", ICLR 2025, arXiv:2411.05735; Algorithms 1-2, LearnParams).

Each round of `update_steps` training steps starts with LearnParams: `lp_rounds` random
permutations of the K domains give K * lp_rounds probe segments; segment j trains `lp_steps` steps
on the probe mixture m_j (one_hot_factor on domain j, the rest uniform), and the drop of every
domain's validation loss over the segment is added to column j of G:

    G[:, j] += L_val(before segment) - L_val(after segment);   G /= lp_rounds
    A = G M^{-T}   (row j of M is m_j; A = G when one_hot_factor = 1, diag(G_jj / ohf) if diagonal)
    optional normalisation: A -= min(A) if min(A) < 0;  A /= sum(A)
    p_j  <-  p_j * exp(eta * sum_i A_ij)                              (paper; p^0 = the prior)

With `ema` set (the reference's scripts): E = A on the first round, E = (1 - ema) A + ema E_prev
after, and p = prior * exp(eta * sum_i E_ij) (recomputed each round, not accumulated). The rest of
the round trains on p. Probe mixtures are ordinary weight versions marked params["probing"] = True,
so workers need nothing beyond the periodic per-domain validation loss (VAL_LOSS). When the job's
cadence floors, caps or smooths weights, M is built from the probe mixtures as shaped. A validation
loss reported at step s is measured after s completed training steps (what workers send: the
evaluation after steps 0..s-1). A segment that took effect at step t ends at the first update whose
newest validation loss (every domain) has s >= t + lp_steps, i.e. after all `lp_steps` steps of
the probe. Probe orders come from the generator in the state.

Defaults: the reference's seven-domain SlimPajama script (lp_rounds 2, lp_steps 10, one_hot_factor
0.75, normalised A, update_steps 200) with the paper's multiplicative update (ema = None). That
script's eta = 1 was run with ema = 0.1, where p is recomputed from the prior each round; without
the EMA the update accumulates over rounds, and the authors' README says to leave the EMA off at
first and try eta in {0.1, 0.2, 0.5} (its example: 0.2). So `eta` left unset (null) resolves to 1
when `ema` is set and to 0.2 when it is not (our reading of the two sources); an explicit eta wins.
Reference quirk not copied: the reference resets the weights to ones at the first round (dropping
its prior); here the spec's prior is p^0 (identical for a uniform prior).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from mixer.errors import SpecError
from mixer.shaping import shape_weights
from mixer.signals import VAL_LOSS, Window
from mixer.strategies import register
from mixer.strategies.base import Decision, State, Strategy, new_rng, rng_from_state, rng_state


def probe_mixture(K: int, j: int, one_hot_factor: float) -> np.ndarray:
    """m_j: one_hot_factor on domain j, the rest spread uniformly."""
    if K == 1:
        return np.ones(1)
    m = np.full(K, (1.0 - one_hot_factor) / (K - 1))
    m[j] = one_hot_factor
    return m


def estimate_interactions(
    G: np.ndarray, lp_rounds: int, one_hot_factor: float, diagonal: bool, M: np.ndarray | None = None
) -> np.ndarray:
    """A from the summed loss drops G (column j: segments where j was hot). M (row j: the mixture
    applied when j was hot) defaults to the nominal probe mixtures."""
    K = G.shape[0]
    G = G / lp_rounds
    if M is None:
        if one_hot_factor == 1.0:
            return G
        M = np.stack([probe_mixture(K, j, one_hot_factor) for j in range(K)])
    if diagonal:
        return np.diag(np.diag(G) / np.diag(M))
    # A[i] = solve(M, G[i]) for every row i, i.e. A = G M^{-T}.
    return np.linalg.solve(M, G.T).T


def learn_params(
    loss_0: np.ndarray,
    order: np.ndarray,
    losses_after: np.ndarray,
    *,
    lp_rounds: int,
    one_hot_factor: float,
    diagonal: bool,
) -> np.ndarray:
    """LearnParams over one round's recorded segments; losses chain from segment to segment."""
    K = loss_0.shape[0]
    G = np.zeros((K, K))
    prev = np.asarray(loss_0, dtype=np.float64)
    for j, after in zip(order, losses_after):
        after = np.asarray(after, dtype=np.float64)
        G[:, j] += prev - after
        prev = after
    return estimate_interactions(G, lp_rounds, one_hot_factor, diagonal)


def normalize_interactions(A: np.ndarray) -> np.ndarray:
    lo = A.min()
    if lo < 0:
        A = A - lo
    total = A.sum()
    return A / total if total > 0 else A


def aioli_weights(
    A: np.ndarray,
    p_prev: np.ndarray,
    E_prev: np.ndarray | None,
    prior: np.ndarray,
    *,
    eta: float,
    ema: float | None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """New proportions (and the smoothed matrix when ema is set)."""
    if ema is None:
        base, E = p_prev, None
        x = eta * A.sum(axis=0)
    else:
        E = A if E_prev is None else (1.0 - ema) * A + ema * E_prev
        base = prior
        x = eta * E.sum(axis=0)
    with np.errstate(divide="ignore"):
        z = np.log(base) + x
    w = np.exp(z - z.max())
    return w / w.sum(), E


ETA_WITH_EMA = 1.0
"""eta of the reference's seven-domain script, which sets ema = 0.1."""
ETA_WITHOUT_EMA = 0.2
"""eta of the authors' README example, whose advice is to leave the EMA off at first."""
MAX_ETA = 1e3
"""Upper end of eta's range: exp(eta * column sum) must stay finite (normalised A has sum 1)."""


def _fresh(state: State, since: int) -> bool:
    """Every domain has a validation loss measured at step `since` or later."""
    return bool((state["val_step"] >= since).all())


@register
class Aioli(Strategy):
    name = "aioli"
    signals = frozenset({VAL_LOSS})
    defaults: ClassVar[dict[str, Any]] = {
        "eta": None,
        "ema": None,
        "lp_rounds": 2,
        "lp_steps": 10,
        "one_hot_factor": 0.75,
        "normalize": True,
        "diagonal": False,
        "update_steps": 200,
    }

    def validate(self) -> None:
        p = self.params
        eta = p["eta"]
        if eta is not None and (
            isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 < eta <= MAX_ETA
        ):
            raise SpecError(
                "strategy.params.eta",
                f"must be null (1 with ema, 0.2 without) or a number in (0, {MAX_ETA:g}], got {eta!r}",
            )
        ema = p["ema"]
        if ema is not None and (
            isinstance(ema, bool) or not isinstance(ema, (int, float)) or not 0.0 <= ema < 1.0
        ):
            raise SpecError("strategy.params.ema", f"must be null (off) or a number in [0, 1), got {ema!r}")
        for name in ("lp_rounds", "lp_steps", "update_steps"):
            self.check(name, isinstance(p[name], int) and p[name] >= 1, "must be an integer >= 1")
        lo = 1.0 / self.K if self.K > 1 else 0.0
        self.check(
            "one_hot_factor",
            lo < p["one_hot_factor"] <= 1.0,
            f"must lie in ({lo:.6g}, 1] for {self.K} domains",
        )
        M = self._applied_probes()
        if M is not None and (np.linalg.cond(M) > 1e8 or (p["diagonal"] and (np.diag(M) <= 0).any())):
            raise SpecError(
                "strategy.params.one_hot_factor",
                "the cadence's min_weight/max_weight/prior_smoothing shape the probe mixtures into a set that "
                "cannot tell domains apart; raise max_weight or lower prior_smoothing",
            )
        probe = self.K * p["lp_rounds"] * p["lp_steps"]
        self.check(
            "update_steps",
            p["update_steps"] > probe,
            f"must exceed the probe length K * lp_rounds * lp_steps = {probe}",
        )

    def init(self, seed: int) -> State:
        K = self.K
        return {
            "phase": "exploit",
            "next_round": 0,
            "round": 0,
            "val": np.full(K, np.nan),
            "val_step": np.full(K, -1, dtype=np.int64),
            "order": np.zeros(0, dtype=np.int64),
            "segment": 0,
            "segment_start": 0,
            "prev_loss": np.zeros(K),
            "G": np.zeros((K, K)),
            "E": np.zeros((K, K)),
            "p": self.prior.copy(),
            "rng": rng_state(new_rng(seed)),
        }

    @property
    def eta(self) -> float:
        """The step size in force: the given eta, else the default for the EMA setting."""
        if self.params["eta"] is not None:
            return float(self.params["eta"])
        return ETA_WITH_EMA if self.params["ema"] is not None else ETA_WITHOUT_EMA

    def _merge_val(self, state: State, window: Window) -> None:
        val, val_step = state["val"].copy(), state["val_step"].copy()
        for r in window.reports:
            if r.val_loss is None:
                continue
            ok = np.isfinite(r.val_loss) & (r.step >= val_step)
            val[ok] = r.val_loss[ok]
            val_step[ok] = r.step
        state["val"], state["val_step"] = val, val_step

    def _applied_probes(self) -> np.ndarray | None:
        """The probe mixtures as the engine shapes them (floor, cap, prior smoothing), or None
        when shaping leaves them as they are."""
        nominal = np.stack([probe_mixture(self.K, j, self.params["one_hot_factor"]) for j in range(self.K)])
        applied = np.stack([shape_weights(m, self.prior, self.spec.cadence) for m in nominal])
        if np.allclose(applied, nominal, rtol=0.0, atol=1e-12):
            return None
        return applied

    def _probe(self, state: State) -> Decision:
        j = int(state["order"][state["segment"]])
        m = probe_mixture(self.K, j, self.params["one_hot_factor"])
        params = {
            "probing": True,
            "probe_domain": self.spec.domain_names[j],
            "round": state["round"],
            "segment": state["segment"],
        }
        return Decision(weights=m, params=params)

    def update(self, state: State, window: Window) -> tuple[State, Decision | None]:
        state = dict(state)
        self._merge_val(state, window)
        p, K = self.params, self.K
        delay = self.spec.cadence.delay
        if state["phase"] == "exploit":
            if window.step < state["next_round"] or not _fresh(state, state["next_round"]):
                return state, None
            rng = rng_from_state(state["rng"])
            state["order"] = np.concatenate([rng.permutation(K) for _ in range(p["lp_rounds"])]).astype(
                np.int64
            )
            state["rng"] = rng_state(rng)
            state["phase"], state["segment"] = "probe", 0
            state["segment_start"] = window.step + delay
            state["prev_loss"] = state["val"].copy()
            state["G"] = np.zeros((K, K))
            return state, self._probe(state)
        if not _fresh(state, state["segment_start"] + p["lp_steps"]):
            return state, None
        j = int(state["order"][state["segment"]])
        G = state["G"].copy()
        G[:, j] += state["prev_loss"] - state["val"]
        state["G"], state["prev_loss"] = G, state["val"].copy()
        state["segment"] += 1
        if state["segment"] < state["order"].shape[0]:
            state["segment_start"] = window.step + delay
            return state, self._probe(state)
        A = estimate_interactions(
            G, p["lp_rounds"], p["one_hot_factor"], p["diagonal"], self._applied_probes()
        )
        if p["normalize"]:
            A = normalize_interactions(A)
        E_prev = state["E"] if state["round"] > 0 else None
        weights, E = aioli_weights(A, state["p"], E_prev, self.prior, eta=self.eta, ema=p["ema"])
        exploit = p["update_steps"] - K * p["lp_rounds"] * p["lp_steps"]
        state.update(
            phase="exploit",
            p=weights,
            E=E if E is not None else state["E"],
            round=state["round"] + 1,
            next_round=window.step + delay + exploit,
        )
        params = {"probing": False, "round": state["round"], "interaction_colsum": A.sum(axis=0).tolist()}
        return state, Decision(weights=weights, params=params)
