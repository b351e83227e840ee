"""DGA: Dynamic Gradient Alignment for online data mixing (Fan, Grangier, Ablin 2024,
arXiv:2410.02498), with the DoGE update it grows from (Fan, Pagliardini, Jaggi, "DoGE: Domain
Reweighting with Generalization Estimation", ICML 2024, arXiv:2310.15393, Algorithm 1).

Every T steps (the ALIGNMENT signal's cadence in the job spec) the worker measures, per domain i,
the alignment of that domain's gradient with the target gradient,

    W_i = < grad l_i , sum_{j in target} grad l_j >     (DoGE eq. 3; DGA's <grad l_i, grad L_spe>)

and the service takes one mirror-descent step on the simplex, then smooths:

    W      <- clip(W / (mean_i ||grad l_i|| + 1e-6), clip_min, clip_max)
    alpha' =  softmax(log alpha + eta * W)
    alpha  <- ema * alpha + (1 - ema) * ((1 - eps) alpha' + eps / K)

Worker side (mixer.megatron.probes.AlignmentProbe), as DoGE computes its scores: each domain's
gradient (and the target data's) is clipped on its own to the training's max_grad_norm before the
products, g <- g min(1, max_norm / (||g|| + 1e-6)); each domain's probe batch is its share of the
training batch under the mixture in force (at least `align_samples` per rank; ours: DoGE reads the
domains' gradients off the training batch itself, and a domain absent from it keeps a stale row,
where we measure every domain on its own data).

The normalisation by the mean domain-gradient norm (DoGE) applies when the worker sends it as
`extra["grad_norm_mean"]`; otherwise W is the raw alignment. When the worker sends its current
learning rate lr_t as `extra["lr"]` (our trainers do), the step size is lr_t / mu, DoGE's scaling
(Algorithm 1; `mu` = 0.01 as its config/doge.json); without it the step size is `eta` (ours, 0.1).
`target` names the domains whose gradient is the target (specialised DGA); empty means all domains
(general, DoGE's universal generalisation), and `target_prefix` names a target-only data prefix
(DoGE's 'mix' set) instead.
Workers read these from the job spec. `exclude_self` drops <g_i, g_i> from W_i when i is a target
domain, as the DoGE paper does; its reference code never drops it (a set comparison of tensors is
always False), which `doge_update(..., exclude_self=False)` reproduces for tests/conformance/doge.json.

`doge_update` is the full DoGE step on per-domain gradient vectors (per-domain clipping, stale rows
for absent domains, scores scaled by the learning rate lr_t, eta = lr_t / mu); the strategy runs the
same `alignment_step` on the scalars workers send. DGA has no public code; eta, the clip range and
ema are our defaults (the clip range, eps = 0 and mu follow DoGE's dw_min/dw_max, reweight_eps and
config/doge.json's mu).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from mixer.errors import SpecError
from mixer.signals import ALIGNMENT, Window
from mixer.strategies import register
from mixer.strategies.base import Decision, State, Strategy


def alignment_step(
    alpha: np.ndarray,
    alignment: np.ndarray,
    *,
    eta: float,
    clip_min: float,
    clip_max: float,
    norm: float | None = None,
    eps: float = 0.0,
) -> np.ndarray:
    """softmax(log alpha + eta * clip(W)) with W = alignment (/ (norm + 1e-6)), then eps-smoothing."""
    W = np.asarray(alignment, dtype=np.float64)
    if norm is not None:
        W = W / (norm + 1e-6)
    W = np.clip(W, clip_min, clip_max)
    with np.errstate(divide="ignore"):
        z = np.log(alpha) + eta * W
    w = np.exp(z - z.max())
    w = w / w.sum()
    return (1.0 - eps) * w + eps / alpha.shape[0]


def clip_gradient(g: np.ndarray, max_norm: float) -> np.ndarray:
    """torch.nn.utils.clip_grad_norm_ on one domain's gradient."""
    return g * min(1.0, max_norm / (float(np.linalg.norm(g)) + 1e-6))


def doge_update(
    alpha: np.ndarray,
    rows: np.ndarray,
    grads: Sequence[np.ndarray | None],
    *,
    train: Sequence[int],
    target: Sequence[int],
    lr: float,
    mu: float,
    max_grad_norm: float,
    dw_min: float = 0.0,
    dw_max: float = 5.0,
    eps: float = 0.0,
    exclude_self: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One DoGE step. `rows` holds every domain's last clipped gradient (train and target ids
    index it); `grads[i]` is None for a domain absent this step, which keeps its stale row.
    Returns (new train weights, new rows, sum_i alpha_i g_i over present train domains)."""
    rows = np.array(rows, dtype=np.float64, copy=True)
    for i, g in enumerate(grads):
        if g is not None:
            rows[i] = clip_gradient(np.asarray(g, dtype=np.float64), max_grad_norm)
    train, target = list(train), list(target)
    T = rows[train]
    W = T @ rows[target].sum(axis=0)
    if exclude_self:
        W -= np.array([T[k] @ T[k] if i in target else 0.0 for k, i in enumerate(train)])
    norm = float(np.linalg.norm(T, axis=1).mean())
    new = alignment_step(alpha, W, eta=lr / mu, clip_min=dw_min, clip_max=dw_max, norm=norm, eps=eps)
    present = [k for k, i in enumerate(train) if grads[i] is not None]
    model_grad = (new[present, None] * T[present]).sum(axis=0) if present else np.zeros(rows.shape[1])
    return new, rows, model_grad


@register
class DGA(Strategy):
    name = "dga"
    signals = frozenset({ALIGNMENT})
    defaults: ClassVar[dict[str, Any]] = {
        "eta": 0.1,
        "mu": 0.01,
        "clip_min": 0.0,
        "clip_max": 5.0,
        "ema": 0.5,
        "eps": 0.0,
        "target": [],
        "target_prefix": "",
        "exclude_self": True,
    }

    def validate(self) -> None:
        p = self.params
        self.check("eta", p["eta"] > 0, "must be > 0")
        self.check("mu", 0 < p["mu"] <= 1e6, "must lie in (0, 1e6]")
        self.check("clip_max", p["clip_max"] > p["clip_min"], "must exceed clip_min")
        self.check("ema", 0.0 <= p["ema"] < 1.0, "must lie in [0, 1)")
        self.check("eps", 0.0 <= p["eps"] <= 1.0, "must lie in [0, 1]")
        target = p["target"]
        if not isinstance(target, list) or not all(isinstance(t, str) for t in target):
            raise SpecError("strategy.params.target", f"must be a list of domain names, got {target!r}")
        unknown = sorted(set(target) - set(self.spec.domain_names))
        if unknown:
            raise SpecError(
                "strategy.params.target",
                f"unknown domain {unknown[0]!r}; domains: {', '.join(self.spec.domain_names)}",
            )
        if len(set(target)) != len(target):
            raise SpecError("strategy.params.target", "names a domain twice")
        if not isinstance(p["target_prefix"], str):
            raise SpecError(
                "strategy.params.target_prefix", f"must be a data prefix string, got {p['target_prefix']!r}"
            )
        if target and p["target_prefix"]:
            raise SpecError(
                "strategy.params.target_prefix",
                "give either target (domain names) or target_prefix, not both",
            )

    def init(self, seed: int) -> State:
        return {"alpha": self.prior.copy(), "avg_sum": np.zeros(self.K), "updates": 0}

    def update(self, state: State, window: Window) -> tuple[State, Decision | None]:
        p = self.params
        alpha, avg_sum, updates = state["alpha"], state["avg_sum"], state["updates"]
        for r in window.reports:
            if r.alignment is None:
                continue
            norm, lr = _extra(r.extra, "grad_norm_mean"), _extra(r.extra, "lr")
            stepped = alignment_step(
                alpha,
                r.alignment,
                eta=p["eta"] if lr is None else lr / p["mu"],
                clip_min=p["clip_min"],
                clip_max=p["clip_max"],
                norm=norm,
                eps=p["eps"],
            )
            alpha = p["ema"] * alpha + (1.0 - p["ema"]) * stepped
            avg_sum = avg_sum + alpha
            updates += 1
        if updates == state["updates"]:
            return state, None
        new = {"alpha": alpha, "avg_sum": avg_sum, "updates": updates}
        return new, Decision(weights=alpha, params={"avg_weights": (avg_sum / updates).tolist()})


def _extra(extra: dict[str, float], key: str) -> float | None:
    """A finite, non-negative scalar the worker sent in Report.extra, else None."""
    v = extra.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)) or not np.isfinite(v) or v < 0:
        return None
    return float(v)
