"""ADO: Adaptive Data Optimization with per-domain scaling laws (Jiang, Zhou, Feng, Malladi, Kolter,
"Adaptive Data Optimization: Dynamic Sample Selection with Scaling Laws", ICLR 2025,
arXiv:2410.11820; Section 3 and Algorithm 1).

Each domain k gets a power law in n_k, the data of that domain seen so far (samples or tokens, the
job's unit):

    L_k(n) = eps_k + beta_k * n^(-alpha_k)

fitted online to the domain's smoothed training loss: Huber loss (delta 1e-3) between
log L_k(n) = logsumexp(log beta_k - alpha_k log n, log eps_k) and log(loss), minimised with
L-BFGS-B from the best two points of a 3 x 3 grid of starts. Points before `warmup_steps` are
left out; the fit is redone every `refit_every` steps (first once warm-up plus one interval has
passed). Then:

    -dL_k/dn  = alpha_k (L_k(n_k) - eps_k) / n_k                     (forecast learning speed)
    h_k      <- gamma1 * q_k + (1 - gamma1) * h_k                     (q: realised sampling share)
    rho_k     ~ mu_k * h_k^s * (-dL_k/dn)                             (preference; lambda_k = h_k^s)
    pi        = gamma2 * rho + (1 - gamma2) * pi_bar                  (pi_bar: running mean of rho, from mu)
    pi_k     <- max(pi_k, delta_min), renormalised

mu is the spec's prior. Defaults: gamma1 = gamma2 = 0.1, s = 0.5, delta_min = 0.01, refits every
1000 steps after a 500-step warm-up (the values public implementations of the paper use). One
update window is one step of the recursions.
Not in the paper: a domain without a fit yet (fewer than 3 points) takes the mean learning speed of
the fitted ones, and the per-domain history keeps at most `max_points` points (halved when full).
"""

from __future__ import annotations

import contextlib

import numpy as np

from mixer.signals import DOMAIN_LOSS, Window
from mixer.strategies import register
from mixer.strategies.base import Decision, State, Strategy

MIN_POINTS = 3
GRID_ALPHA = (0.05, 0.2, 0.5)
GRID_EPS_SHARE = (0.25, 0.6, 0.9)


def power_law_objective(
    theta: np.ndarray, log_n: np.ndarray, log_L: np.ndarray, delta: float
) -> tuple[float, np.ndarray]:
    """Mean Huber loss of the log-space fit and its gradient in (log beta, log eps, alpha)."""
    # Python floats and few temporaries: L-BFGS-B calls this tens of times per domain and refit,
    # on arrays of a few hundred points, where numpy's per-call overhead is most of the cost.
    # Every value is computed in the same order as before, so fits are unchanged to the bit.
    log_beta, log_eps, alpha = float(theta[0]), float(theta[1]), float(theta[2])
    u = log_n * -alpha
    u += log_beta
    pred = np.logaddexp(u, log_eps)
    r = pred - log_L
    a = np.abs(r)
    small = a <= delta
    m = r.shape[0]
    loss = float(np.where(small, 0.5 * r * r, delta * (a - 0.5 * delta)).sum()) / m
    d = np.where(small, r, np.copysign(delta, r))
    d /= m
    share = np.exp(u - pred)  # d pred / d u; 1 - share is d pred / d log eps
    ds = d * share
    # Summed as the first version summed them: a refit must not change by a rounding.
    return loss, np.array([ds.sum(), (d * (1.0 - share)).sum(), -(ds * log_n).sum()])


def _grid_losses(x0: np.ndarray, log_n: np.ndarray, log_L: np.ndarray, delta: float) -> np.ndarray:
    """Mean Huber loss of every start (rows of x0) at once."""
    pred = np.logaddexp(x0[:, :1] - x0[:, 2:] * log_n, x0[:, 1:2])
    a = np.abs(pred - log_L)
    return np.where(a <= delta, 0.5 * a * a, delta * (a - 0.5 * delta)).mean(axis=1)


_BLAS = None  # threadpoolctl's controller once looked up; False when threadpoolctl is missing


def _one_blas_thread():
    """Limit BLAS to one thread while fitting: L-BFGS-B makes many tiny BLAS calls, and on a busy
    machine multi-threaded OpenBLAS waits on its threads at each one (measured 5-15x slower)."""
    global _BLAS
    if _BLAS is None:
        import scipy.optimize  # noqa: F401 - loads scipy's OpenBLAS, so the controller sees it

        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:  # optional: without it the fits only run slower
            _BLAS = False
        else:
            _BLAS = ThreadpoolController()  # after scipy is imported, so its OpenBLAS is listed
    return _BLAS.limit(limits=1, user_api="blas") if _BLAS else contextlib.nullcontext()


def fit_power_law(n: np.ndarray, L: np.ndarray, *, delta: float = 1e-3, starts: int = 2) -> np.ndarray:
    """(log beta, log eps, alpha) of L(n) = eps + beta n^-alpha: the objective is evaluated on a grid
    of (alpha, eps) guesses (beta matched to the first point) and L-BFGS-B runs from the best
    `starts` of them; the best result wins."""
    # Imported here: scipy.optimize costs ~1 s, and every server start imports this module.
    from scipy.optimize import minimize

    log_n = np.log(n)
    L = np.maximum(L, 1e-8)
    log_L = np.log(L)
    lo, hi = float(L.min()), float(L.max())
    bounds = [(-20.0, 20.0), (np.log(lo) - 10.0, np.log(hi)), (1e-4, 1.0)]
    lower, upper = [b[0] for b in bounds], [b[1] for b in bounds]
    starts_x = []
    for alpha0 in GRID_ALPHA:
        for eps_share in GRID_EPS_SHARE:
            eps0 = eps_share * lo
            log_beta0 = np.log(max(L[0] - eps0, 1e-8)) + alpha0 * log_n[0]
            starts_x.append(np.clip([log_beta0, np.log(eps0), alpha0], lower, upper))
    x0s = np.array(starts_x)
    losses = _grid_losses(x0s, log_n, log_L, delta)
    order = np.argsort(losses, kind="stable")  # ties keep grid order
    best, best_fun = x0s[order[0]], float(losses[order[0]])
    for x0 in x0s[order[:starts]]:
        res = minimize(
            power_law_objective,
            x0,
            args=(log_n, log_L, delta),
            jac=True,
            method="L-BFGS-B",
            bounds=bounds,
            options={"maxiter": 200},
        )
        if np.isfinite(res.fun) and res.fun < best_fun:
            best, best_fun = res.x, res.fun
    return np.asarray(best, dtype=np.float64)


def learning_speed(fit: np.ndarray, n: np.ndarray) -> np.ndarray:
    """-dL/dn = alpha (L(n) - eps) / n = alpha beta n^(-alpha - 1), per domain (fit rows)."""
    log_beta, alpha = fit[:, 0], fit[:, 2]
    return alpha * np.exp(log_beta - (alpha + 1.0) * np.log(n))


@register
class ADO(Strategy):
    name = "ado"
    signals = frozenset({DOMAIN_LOSS})
    defaults = {
        "gamma1": 0.1,
        "gamma2": 0.1,
        "s": 0.5,
        "delta_min": 0.01,
        "warmup_steps": 500,
        "refit_every": 1000,
        "loss_smoothing": 0.9,
        "max_points": 256,
        "huber_delta": 1e-3,
    }

    def validate(self) -> None:
        p = self.params
        for name in ("gamma1", "gamma2"):
            self.check(name, 0.0 < p[name] <= 1.0, "must lie in (0, 1]")
        self.check("s", p["s"] >= 0, "must be >= 0")
        self.check(
            "delta_min",
            0.0 <= p["delta_min"] * self.K < 1.0,
            f"must be >= 0 and below 1/K = {1.0 / self.K:.6g}",
        )
        self.check(
            "warmup_steps",
            isinstance(p["warmup_steps"], int) and p["warmup_steps"] >= 0,
            "must be an integer >= 0",
        )
        self.check(
            "refit_every",
            isinstance(p["refit_every"], int) and p["refit_every"] >= 1,
            "must be an integer >= 1",
        )
        self.check("loss_smoothing", 0.0 <= p["loss_smoothing"] < 1.0, "must lie in [0, 1)")
        self.check(
            "max_points",
            isinstance(p["max_points"], int) and p["max_points"] >= 2 * MIN_POINTS,
            f"must be an integer >= {2 * MIN_POINTS}",
        )
        self.check("huber_delta", p["huber_delta"] > 0, "must be > 0")

    def init(self, seed: int) -> State:
        K, H = self.K, self.params["max_points"]
        return {
            "n": np.zeros(K),
            "loss": np.full(K, np.nan),
            "hist_n": np.zeros((K, H)),
            "hist_loss": np.zeros((K, H)),
            "hist_len": np.zeros(K, dtype=np.int64),
            "fit": np.zeros((K, 3)),
            "fitted": np.zeros(K, dtype=bool),
            "last_fit": -1,
            "h": self.prior.copy(),
            "pi_bar": self.prior.copy(),
            "updates": 0,
        }

    def update(self, state: State, window: Window) -> tuple[State, Decision | None]:
        p = self.params
        counts = (
            window.sample_count().astype(np.float64) if self.spec.unit == "samples" else window.token_count()
        )
        mean_loss, seen = window.mean_loss()
        n = state["n"] + counts
        smooth = state["loss"].copy()
        first = seen & np.isnan(smooth)
        again = seen & ~first
        smooth[first] = mean_loss[first]
        smooth[again] = p["loss_smoothing"] * smooth[again] + (1.0 - p["loss_smoothing"]) * mean_loss[again]

        hist_n, hist_loss, hist_len = (
            state["hist_n"].copy(),
            state["hist_loss"].copy(),
            state["hist_len"].copy(),
        )
        if window.step >= p["warmup_steps"]:
            H = hist_n.shape[1]
            ks = np.flatnonzero(seen & (n > 0))
            full = ks[hist_len[ks] == H]
            if full.size:  # halve the history, keeping every other point
                keep = (H + 1) // 2
                hist_n[full, :keep], hist_loss[full, :keep] = hist_n[full, ::2], hist_loss[full, ::2]
                hist_len[full] = keep
            hist_n[ks, hist_len[ks]], hist_loss[ks, hist_len[ks]] = n[ks], smooth[ks]
            hist_len[ks] += 1

        h = state["h"]
        if counts.sum() > 0:
            h = p["gamma1"] * counts / counts.sum() + (1.0 - p["gamma1"]) * h

        fit, fitted, last_fit = state["fit"], state["fitted"], state["last_fit"]
        due = last_fit < 0 and window.step >= p["warmup_steps"] + p["refit_every"]
        if due or (last_fit >= 0 and window.step - last_fit >= p["refit_every"]):
            fit, fitted = fit.copy(), fitted.copy()
            with _one_blas_thread():
                for k in range(self.K):
                    m = int(hist_len[k])
                    if m >= MIN_POINTS and np.unique(hist_n[k, :m]).size >= MIN_POINTS:
                        fit[k] = fit_power_law(hist_n[k, :m], hist_loss[k, :m], delta=p["huber_delta"])
                        fitted[k] = True
            last_fit = window.step

        new = dict(
            state,
            n=n,
            loss=smooth,
            hist_n=hist_n,
            hist_loss=hist_loss,
            hist_len=hist_len,
            h=h,
            fit=fit,
            fitted=fitted,
            last_fit=last_fit,
        )
        usable = fitted & (n > 0)
        if not usable.any():
            return new, None
        speed = np.zeros(self.K)
        speed[usable] = learning_speed(fit[usable], n[usable])
        speed[~usable] = speed[usable].mean()
        rho = self.prior * np.power(h, p["s"]) * speed
        total = rho.sum()
        rho = rho / total if total > 0 and np.isfinite(total) else self.prior.copy()
        pi = p["gamma2"] * rho + (1.0 - p["gamma2"]) * state["pi_bar"]
        pi = np.maximum(pi / pi.sum(), p["delta_min"])
        pi = pi / pi.sum()
        updates = state["updates"] + 1
        new["pi_bar"] = state["pi_bar"] + (rho - state["pi_bar"]) / (updates + 1)
        new["updates"] = updates
        params = {
            "rho": rho.tolist(),
            "scaling_alpha": [float(a) if ok else None for a, ok in zip(fit[:, 2], fitted)],
            "scaling_eps": [float(np.exp(e)) if ok else None for e, ok in zip(fit[:, 1], fitted)],
        }
        return new, Decision(weights=pi, params=params)
