"""Static mixtures: fixed weights, temperature sampling over domain sizes, a step schedule.

- fixed: the spec's prior weights, unchanged (Megatron's `--data-path` blend).
- temperature: w_i proportional to n_i^(1/T) over domain sizes n_i (T = 1 is the natural
  mixture, T -> infinity uniform), the form multilingual pretraining uses by hand
  (e.g. Conneau et al. 2020, XLM-R, with alpha = 1/T).
- schedule: a piecewise-constant list of {step, weights}; the entry with the largest
  step <= the current step holds.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from mixer.errors import SpecError
from mixer.signals import Window
from mixer.strategies import register
from mixer.strategies.base import Decision, State, Strategy

MODES = ("fixed", "temperature", "schedule")


@register
class Static(Strategy):
    name = "static"
    signals = frozenset()
    defaults: ClassVar[dict[str, Any]] = {"mode": "fixed", "temperature": 1.0, "schedule": []}

    def validate(self) -> None:
        mode = self.params["mode"]
        if mode not in MODES:
            raise SpecError("strategy.params.mode", f"{mode!r} is not one of {', '.join(MODES)}")
        if mode == "temperature":
            self.check("temperature", self.params["temperature"] > 0, "must be > 0")
            sizes = np.array([d.size for d in self.spec.domains])
            if not (sizes > 0).all():
                raise SpecError("domains", "temperature sampling needs size > 0 for every domain")
        if mode == "schedule":
            self._schedule = self._parse_schedule(self.params["schedule"])

    def _parse_schedule(self, raw: Any) -> list[tuple[int, np.ndarray]]:
        if not isinstance(raw, list) or not raw:
            raise SpecError("strategy.params.schedule", "must be a non-empty list of {step, weights}")
        out = []
        for i, item in enumerate(raw):
            where = f"strategy.params.schedule[{i}]"
            if not isinstance(item, dict) or set(item) != {"step", "weights"}:
                raise SpecError(where, "must be a mapping with exactly 'step' and 'weights'")
            step, w = item["step"], item["weights"]
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                raise SpecError(f"{where}.step", f"must be an integer >= 0, got {step!r}")
            if out and step <= out[-1][0]:
                raise SpecError(f"{where}.step", "steps must increase")
            if isinstance(w, dict):
                unknown = set(w) - set(self.spec.domain_names)
                if unknown:
                    raise SpecError(f"{where}.weights", f"unknown domain {min(unknown)!r}")
                w = [w.get(n, 0.0) for n in self.spec.domain_names]
            arr = np.asarray(w, dtype=np.float64)
            if arr.shape != (self.K,) or not np.isfinite(arr).all() or (arr < 0).any() or arr.sum() <= 0:
                raise SpecError(f"{where}.weights", f"must be {self.K} finite non-negative numbers with a positive sum")
            out.append((step, arr / arr.sum()))
        return out

    def _weights_at(self, step: int) -> np.ndarray:
        mode = self.params["mode"]
        if mode == "temperature":
            sizes = np.array([d.size for d in self.spec.domains], dtype=np.float64)
            w = sizes ** (1.0 / self.params["temperature"])
            return w / w.sum()
        if mode == "schedule":
            current = self.prior
            for s, w in self._schedule:
                if s <= step:
                    current = w
            return current
        return self.prior

    def init(self, seed: int) -> State:
        return {"weights": self._weights_at(0)}

    def initial_weights(self, state: State) -> np.ndarray:
        return state["weights"]

    def update(self, state: State, window: Window) -> tuple[State, Decision | None]:
        w = self._weights_at(window.step)
        if np.array_equal(w, state["weights"]):
            return state, None
        return {"weights": w}, Decision(weights=w)
