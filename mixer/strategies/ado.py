"""ADO: Adaptive Data Optimization (Jiang, Zhou, Feng, Malladi, Kolter, "Adaptive Data Optimization:
Dynamic Sample Selection with Scaling Laws", ICLR 2025, arXiv:2410.11820; Section 3 and Algorithm 1),
computed as the authors' code computes it: yidingjiang/ado @ bc3d8d0, `AdoSelector` in
src/data_selectors/ado.py, driven once per training step by src/dataloader/adaptive_loader.py.
tests/conformance/ado.json holds that code's numbers; tests/strategies/test_ado_conformance.py
checks this module against them.

Equations (the paper's, in the form the reference evaluates them; labels E1-E7 are ours):

    (E1) scaling law     L_k(n) = eps_k + beta_k * n^-alpha_k
    (E2) fit             min over (a, e, alpha), beta = exp(a), eps = exp(e):
                           sum_i huber_delta(log y_i - logsumexp(a - alpha log x_i, e))
                           + max(alpha - 0.8, 0) - min(alpha, 0.001) + max(a - 6.5, 0) - min(e - 0.5, 0)
    (E3) learning speed  v_k = -dL_k/dn = max(alpha_k, 0.05) * (L_k(n) - eps_k) / n
    (E4) credit          h_k(t) = gamma1 * c_k(t)/B(t) + (1 - gamma1) * h_k(t-1),   lambda_k = h_k^s
    (E5) preference      rho_k(t) = mu_k * lambda_k(t) * v_k(t) / sum_j (...)
    (E6) floor           rho~(t) = rho(t) floored at delta_min, then renormalised
    (E7) mixture         pi(t) = (1 - gamma2) * pibar(t-1) + gamma2 * rho~(t)
                         pibar(t) = (1 - 1/(t+1)) * pibar(t-1) + rho~(t)/(t+1),   pibar(-1) = h(-1) = mu

mu is the spec's prior; t is the training step (0-based); c_k(t) are the step's samples of domain
k and B(t) = sum_k c_k(t). Defaults are the reference's: gamma1 = gamma2 = 0.1, s = 0.5,
delta_min = 0.01, exponent floor 0.05, huber delta 1e-3.

What the reference does, and so this module:
- n in (E1)/(E3) is, with `use_same_step_size` (the reference default), the total number of
  samples trained: every domain is credited with the whole batch at every step, so n is the same
  for all domains and the learning speed's denominator is common. With it off, n_k counts domain
  k's own samples.
- Every step appends a per-domain loss row (a domain's mean loss in the step; a domain absent from
  the step repeats its previous value; at the first row an absent domain takes the batch mean)
  and a count row, and moves h (E4) and, once fitted, rho, pi and pibar (E5-E7): these are
  per-step recursions, whatever the update cadence.
- A fit runs at every step t >= `start_step` with t % `refit_every` == 0. Its data: the whole
  loss-row history smoothed by a Savitzky-Golay filter (`savgol_window` 101, cubic; at each end
  the rows within half a window take the value of the polynomial fitted to the first / last
  window), then the rows `warmup_steps`, +10, +20, ... (the reference's `ignore_steps`), each
  with x = that row's n. The fit (E2) starts from the 8 x 8 x 8 grid a in {-2..5},
  e in {-2, -1.5, .., 1.5}, alpha in {0, 0.1, .., 0.7}; the lowest objective wins; parameters
  that are not finite are rejected (the previous ones stay). Each domain is fitted on its own.
- No distribution (the prior holds) before the first fit or while t < `start_step`.

Ours (where the service differs from the reference loop, or the reference leaves it open):
- Cadence: the service updates once per window of `cadence.update_every` steps. Each update runs
  the per-step recursions above for every step of the window, in step order, from the window's
  reports (all reports of one step, from every source, are summed into that step). The version
  it publishes is pi of the window's last step. A report for a step already processed (a late
  rank) is counted with the window's first new step. A step is a row only if it reports samples
  (a step without any is skipped); row indices count such steps, and equal the step numbers when
  every step reports. A fit that falls on a skipped step runs at the next reported step.
- Units: a domain's loss is the token mean of the step's loss (the reference averages per-sample
  losses; equal for fixed-length samples); counts are samples, or tokens when the spec's unit is
  tokens (a common factor of n leaves rho unchanged with `use_same_step_size`).
- Arithmetic is float64 throughout (the reference fits in float32 and evaluates exp(a), exp(e) and
  n in float32).
- The fit: L-BFGS-B (scipy) on the objective scaled by 1/delta, inside the region where the
  penalties of (E2) are linear; where the data pull a parameter across a penalty's kink by more
  than the penalty's slope, the search continues in the next region, so the minimum is that of
  (E2) itself. It runs from the `fit_starts` grid starts (projected into the penalty-free box
  a <= 6.5, e >= 0.5, 0.001 <= alpha <= 0.8) with the lowest objective at the start, plus the
  beta -> 0 limit (L = eps, solved exactly; the reference reaches it as a -> -inf), which wins
  ties. The reference runs L-BFGS from all 512 starts; two reach, on every fit of the
  conformance vectors, the reference's objective within 3e-7 (its slack is 1e-6) at a fraction
  of the cost. Starts are ranked on at most 64 evenly spaced points. A fit through a single
  point (the released cadence's first) is underdetermined: the limit wins it, every learning
  speed is 0 and rho = mu until the next fit (the reference keeps an arbitrary curve).
- A fit due before any row >= `warmup_steps` exists is skipped.
- Defaults that are ours: start_step 0 (the released configs say 500; with their ignore_steps
  1000 and update interval 1000 every start_step up to 1000 gives the same run, and short jobs
  need not set it), max_points 1000, fit_starts 2.
- Smoothing while there are fewer rows than `savgol_window` (the reference raises an error): the
  window shrinks to the largest odd length available (and the degree to below it).
- Memory: smoothed fit points are final once half a window of newer rows exists; the state keeps
  those points (at most `max_points`; when full, every other one is dropped and the spacing
  doubles) and the newest `savgol_window` rows, not the whole history.
- Guards: losses are floored at 1e-12 before the log; points with x <= 0 (a domain not yet
  sampled, without `use_same_step_size`) are left out of that domain's fit, and a domain without
  any point leaves the whole fit rejected; a domain with n = 0 has learning speed 0; if every
  learning speed is 0, rho = mu.
Not implemented: the reference's `y_axis='val_loss'` mode (not its default). The previous ADO of
this module (per-domain counts, EMA-smoothed losses, one recursion step per update window,
pibar averaged by update count, floor after mixing) is gone.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, ClassVar

import numpy as np

from mixer.signals import DOMAIN_LOSS, Window
from mixer.strategies import register
from mixer.strategies.ado_fit import fit_objective, fit_scaling_law, fit_scaling_laws
from mixer.strategies.base import Decision, State, Strategy

# The fit (E2) lives in ado_fit.py; its public functions are named here too (tests, users).
__all__ = ["ADO", "ado_distribution", "clip_min_probability", "fit_objective", "fit_scaling_law"]


def clip_min_probability(p: np.ndarray, floor: float) -> np.ndarray:
    """(E6) as the reference computes it: scale by (1 - max(floor K - sum, 0)) / sum (1 for a
    distribution), floor, renormalise; the smallest entry ends slightly below the floor."""
    total = p.sum()
    q = np.maximum(p * ((1.0 - max(floor * p.shape[0] - total, 0.0)) / total), floor)
    return q / q.sum()


def ado_distribution(
    fit: np.ndarray,
    n: np.ndarray,
    p_history: np.ndarray,
    mu: np.ndarray,
    pi_bar: np.ndarray,
    step: int,
    *,
    s: float = 0.5,
    gamma2: float = 0.1,
    delta_min: float = 0.01,
    exponent_floor: float = 0.05,
) -> dict[str, np.ndarray]:
    """(E3)-(E7) at one step: `fit` rows are (beta, eps, alpha) per domain, `pi_bar` the running
    mixture before the step. Returns every intermediate, `p` (the sampling distribution) and
    `pi_bar` (after the step)."""
    beta, eps, alpha = fit[:, 0], fit[:, 1], fit[:, 2]
    exponent = np.maximum(alpha, exponent_floor)
    if n.min() > 0:
        predicted = eps + beta * n**-alpha
        speed = exponent * (predicted - eps) / n
    else:  # a domain not yet sampled (per-domain counts): no learning speed
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            predicted = eps + beta * n**-alpha
            speed = exponent * (predicted - eps) / n
    if not (np.isfinite(speed).all() and np.isfinite(predicted).all()):
        speed = np.where((n > 0) & np.isfinite(speed), speed, 0.0)
        predicted = np.where(np.isfinite(predicted), predicted, eps)
    h = np.sqrt(p_history) if s == 0.5 else p_history**s
    rho_un = speed * mu * h
    total = rho_un.sum()
    rho = rho_un / total if total > 0 and np.isfinite(total) else mu / mu.sum()
    rho_clipped = clip_min_probability(rho, delta_min)
    w = 1.0 / (step + 1)
    return {
        "predicted_loss": predicted,
        "exponent_clipped": exponent,
        "learning_speed": speed,
        "h": h,
        "rho_unnormalized": rho_un,
        "rho": rho,
        "rho_clipped": rho_clipped,
        "p": (1.0 - gamma2) * pi_bar + gamma2 * rho_clipped,
        "pi_bar": (1.0 - w) * pi_bar + w * rho_clipped,
    }


@functools.cache
def savgol_matrix(window: int, order: int) -> np.ndarray:
    """Row z holds the weights that give, from `window` consecutive values, the value at position z
    of their least-squares polynomial of degree `order` (Savitzky-Golay; row window // 2 is the
    filter's interior kernel, the other rows its 'interp' edges)."""
    t = np.arange(window, dtype=np.float64) - (window - 1) / 2.0
    A = np.vander(t, order + 1, increasing=True)
    out = A @ np.linalg.pinv(A)
    out.flags.writeable = False
    return out


def smooth_rows(rows: np.ndarray, positions: list[int], window: int, order: int) -> np.ndarray:
    """Savitzky-Golay smoothing (scipy's mode 'interp') of `rows` (one row per step), evaluated only
    at `positions`; with fewer rows than `window`, the window shrinks to the largest odd length
    available and the degree to below it."""
    T = rows.shape[0]
    if T < window:
        window = T if T % 2 else T - 1
        order = min(order, window - 1)
    M, half = savgol_matrix(window, order), window // 2
    out = np.empty((len(positions), rows.shape[1]))
    for i, r in enumerate(positions):
        if r < half:
            out[i] = M[r] @ rows[:window]
        elif r > T - 1 - half:
            out[i] = M[r - (T - window)] @ rows[T - window :]
        else:
            out[i] = M[half] @ rows[r - half : r + half + 1]
    return out


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


def _is_int(v: Any, lo: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


@register
class ADO(Strategy):
    name = "ado"
    signals = frozenset({DOMAIN_LOSS})
    defaults: ClassVar[dict[str, Any]] = {
        "gamma1": 0.1,
        "gamma2": 0.1,
        "s": 0.5,
        "delta_min": 0.01,
        "exponent_floor": 0.05,
        "warmup_steps": 1000,
        "start_step": 0,
        "refit_every": 1000,
        "use_same_step_size": True,
        "huber_delta": 1e-3,
        "savgol_window": 101,
        "savgol_order": 3,
        "point_every": 10,
        "max_points": 1000,
        "fit_starts": 2,
    }
    # warmup_steps: the reference's ignore_steps (rows before it are no fit points), 1000 as in
    # its released configs/loader/pile_ado.yaml; refit_every: its update_interval (1000, the
    # AdoSelector default the loader keeps); start_step: see the module docstring.

    fitter = staticmethod(fit_scaling_laws)
    """(x, y, delta=, starts=) -> (beta, eps, alpha, objective) per domain; tests may replace it."""

    def validate(self) -> None:
        p = self.params
        for name in ("gamma1", "gamma2"):
            self.check(name, 0.0 < p[name] <= 1.0, "must lie in (0, 1]")
        self.check("s", p["s"] >= 0, "must be >= 0")
        self.check("exponent_floor", p["exponent_floor"] >= 0, "must be >= 0")
        self.check(
            "delta_min",
            0.0 <= p["delta_min"] * self.K < 1.0,
            f"must be >= 0 and below 1/K = {1.0 / self.K:.6g}",
        )
        for name, lo in (("warmup_steps", 0), ("start_step", 0), ("refit_every", 1), ("point_every", 1)):
            self.check(name, _is_int(p[name], lo), f"must be an integer >= {lo}")
        self.check("huber_delta", p["huber_delta"] > 0, "must be > 0")
        self.check(
            "savgol_window",
            _is_int(p["savgol_window"], 1) and p["savgol_window"] % 2 == 1 and p["savgol_window"] <= 10_001,
            "must be an odd integer in [1, 10001]",
        )
        self.check(
            "savgol_order",
            _is_int(p["savgol_order"], 0) and p["savgol_order"] < p["savgol_window"],
            "must be an integer >= 0 and below savgol_window",
        )
        self.check(
            "max_points",
            _is_int(p["max_points"], 2) and p["max_points"] <= 1_000_000,
            "must be an integer in [2, 1e6]",
        )
        self.check(
            "fit_starts",
            _is_int(p["fit_starts"], 1) and p["fit_starts"] <= 512,
            "must be an integer in [1, 512]",
        )

    def init(self, seed: int) -> State:
        K, p = self.K, self.params
        W = p["savgol_window"]
        Kx = 1 if p["use_same_step_size"] else K
        return {
            "n": np.zeros(K),  # samples credited per domain: n of (E1)/(E3)
            "p_history": self.prior.copy(),  # h of (E4)
            "pi_bar": self.prior.copy(),  # pibar of (E7)
            "rows": 0,  # loss rows so far
            "loss_rows": np.zeros((W, K)),  # the newest W loss rows; row r in slot r % W
            "n_rows": np.zeros((W, Kx)),  # n after each of those rows
            "pt_x": np.zeros((0, Kx)),  # final (smoothed) fit points, oldest first: x ...
            "pt_y": np.zeros((0, K)),  # ... and y (at most max_points rows)
            "pt_stride": p["point_every"],  # rows between fit points (doubles when thinned)
            "fit": np.zeros((K, 3)),  # (beta, eps, alpha) per domain
            "has_fit": False,
            "last_fit": -1,  # step of the newest fit attempt
            "last_step": -1,  # newest step processed
        }

    # ------------------------------------------------------------------------- per-step recursions

    def update(self, state: State, window: Window) -> tuple[State, Decision | None]:
        st = self._copy(state)
        last = None
        for step, counts, loss_sum, tokens in self._window_steps(st, window):
            dist = self.step(st, step, counts, loss_sum, tokens)
            if dist is not None:
                last = dist
        if last is None:
            return st, None
        fit = st["fit"]
        params = {  # what a reader needs to see why: the preference and the fitted laws (E1)
            "rho": last["rho"].tolist(),
            "scaling_alpha": fit[:, 2].tolist(),
            "scaling_eps": fit[:, 1].tolist(),
            "scaling_beta": fit[:, 0].tolist(),
        }
        return st, Decision(weights=last["p"], params=params)

    def steps(self, state: State, window: Window) -> tuple[State, list[dict[str, Any]]]:
        """update() with a record per processed step: step, count_row, loss_row, p_history, the fit
        (x, y, beta, eps, alpha, objective, accepted) where one ran, and (E3)-(E7) where computed."""
        st = self._copy(state)
        out = []
        for step, counts, loss_sum, tokens in self._window_steps(st, window):
            record: dict[str, Any] = {}
            dist = self.step(st, step, counts, loss_sum, tokens, record)
            if record:
                record["dist"] = dist
                out.append(record)
        return st, out

    def _copy(self, state: State) -> State:
        return {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in state.items()}

    def _window_steps(self, st: State, window: Window):
        """(step, counts, loss sums, loss tokens) per step of the window, in step order."""
        last = st["last_step"]
        first_new = min((r.step for r in window.reports if r.step > last), default=None)
        groups: dict[int, list] = {}
        for r in window.reports:
            key = r.step if r.step > last or first_new is None else first_new
            groups.setdefault(key, []).append(r)
        K, zeros = self.K, np.zeros(self.K)
        for step in sorted(groups):
            counts, loss_sum, tokens = np.zeros(K), np.zeros(K), np.zeros(K)
            for r in groups[step]:
                c = r.domain_sample_count if self.spec.unit == "samples" else r.domain_token_count
                counts += zeros if c is None else c
                if r.domain_loss_sum is not None and r.domain_token_count is not None:
                    loss_sum += r.domain_loss_sum
                    tokens += r.domain_token_count
            yield step, counts, loss_sum, tokens

    def step(
        self,
        st: State,
        step: int,
        counts: np.ndarray,
        loss_sum: np.ndarray,
        tokens: np.ndarray,
        record: dict[str, Any] | None = None,
    ) -> dict[str, np.ndarray] | None:
        """One training step of the reference loop (update, then curr_dist) on the mutable state
        `st`; returns (E3)-(E7) once a fit exists, else None."""
        p = self.params
        B = float(counts.sum())
        if not B > 0:
            return None
        T, W = st["rows"], p["savgol_window"]
        present = tokens > 0
        if T == 0:
            if not present.any():
                return None
            prev = np.full(self.K, loss_sum[present].sum() / tokens[present].sum())
        else:
            prev = st["loss_rows"][(T - 1) % W]
        row = np.divide(loss_sum, tokens, out=prev.copy(), where=present)
        same = p["use_same_step_size"]
        st["n"] = n = st["n"] + (B if same else counts)
        st["p_history"] = (1.0 - p["gamma1"]) * st["p_history"] + p["gamma1"] * (counts / B)
        st["loss_rows"][T % W] = row
        st["n_rows"][T % W] = n[:1] if same else n
        st["rows"] = T + 1
        self._finalise(st)
        if record is not None:
            record.update(step=step, count_row=np.full(self.K, B) if same else counts.copy(), loss_row=row)
            record["p_history"] = st["p_history"].copy()
        due = (step // p["refit_every"]) * p["refit_every"]
        if due > st["last_step"] and due >= p["start_step"]:
            self._refit(st, step, record)
        st["last_step"] = max(st["last_step"], step)
        if not st["has_fit"] or step < p["start_step"]:
            return None
        dist = ado_distribution(
            st["fit"],
            n,
            st["p_history"],
            self.prior,
            st["pi_bar"],
            step,
            s=p["s"],
            gamma2=p["gamma2"],
            delta_min=p["delta_min"],
            exponent_floor=p["exponent_floor"],
        )
        if record is not None:
            record["pi_bar_before"] = st["pi_bar"]
        st["pi_bar"] = dist["pi_bar"]
        return dist

    # --------------------------------------------------------------------------------- fit points

    def _is_point(self, st: State, r: int) -> bool:
        first = self.params["warmup_steps"]
        return r >= first and (r - first) % st["pt_stride"] == 0

    def _ordered(self, st: State, name: str) -> np.ndarray:
        """The newest min(rows, W) rows of a ring buffer, oldest first."""
        T, W = st["rows"], self.params["savgol_window"]
        return st[name][:T] if T <= W else st[name][np.arange(T - W, T) % W]

    def _finalise(self, st: State) -> None:
        """Store the fit points whose smoothed value can no longer change: once the history holds a
        whole window, the rows at least half a window older than the newest."""
        W = self.params["savgol_window"]
        T, half = st["rows"], W // 2
        if T < W:
            return
        rows = [r for r in range(half) if self._is_point(st, r)] if T == W else []
        rows.append(T - 1 - half)
        rows = [r for r in rows if self._is_point(st, r)]
        if not rows:
            return
        M = savgol_matrix(W, self.params["savgol_order"])
        buf = self._ordered(st, "loss_rows")
        for r in rows:
            if not self._is_point(st, r):  # the spacing doubled while adding
                continue
            self._add_point(st, r, st["n_rows"][r % W], M[r - (T - W)] @ buf)

    def _add_point(self, st: State, r: int, x: np.ndarray, y: np.ndarray) -> None:
        if st["pt_y"].shape[0] >= self.params["max_points"]:  # thin: every other point, double spacing
            st["pt_x"], st["pt_y"] = st["pt_x"][::2].copy(), st["pt_y"][::2].copy()
            st["pt_stride"] *= 2
            if not self._is_point(st, r):
                return
        st["pt_x"] = np.concatenate([st["pt_x"], x[None]])
        st["pt_y"] = np.concatenate([st["pt_y"], y[None]])

    def _fit_points(self, st: State) -> tuple[np.ndarray, np.ndarray]:
        """x (m, 1 or K) and y (m, K): the stored final points, then the newer rows' points smoothed
        with the current window's edge polynomial."""
        p = self.params
        W, order = p["savgol_window"], p["savgol_order"]
        T, half = st["rows"], W // 2
        newer = range(T - half, T) if T >= W else range(T)
        rows = [r for r in newer if self._is_point(st, r)]
        x, y = st["pt_x"], st["pt_y"]
        if rows:
            buf = self._ordered(st, "loss_rows")
            offset = max(T - W, 0)
            ys = smooth_rows(buf, [r - offset for r in rows], W, order)
            xs = st["n_rows"][[r % W for r in rows]]
            x, y = np.concatenate([x, xs]), np.concatenate([y, ys])
        return x, y

    def _refit(self, st: State, step: int, record: dict[str, Any] | None) -> None:
        x, y = self._fit_points(st)
        if not y.shape[0]:
            return
        st["last_fit"] = step
        with _one_blas_thread():
            beta, eps, alpha, objective = self.fitter(
                x, y, delta=self.params["huber_delta"], starts=self.params["fit_starts"]
            )
        fit = np.stack([beta, eps, alpha], axis=1).astype(np.float64)
        accepted = bool(np.isfinite(fit).all())
        if accepted:
            st["fit"] = fit
            st["has_fit"] = True
        if record is not None:
            record["fit"] = {
                "x": np.broadcast_to(x, y.shape).copy(),
                "y": y,
                "beta": beta,
                "eps": eps,
                "alpha": alpha,
                "objective": objective,
                "accepted": accepted,
            }
