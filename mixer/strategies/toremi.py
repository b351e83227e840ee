"""ToReMi: topic-aware data reweighting in two stages (Zhu et al. 2025, "ToReMi: Topic-Aware
Data Reweighting for Dynamic Pre-Training Data Selection", 2025).

Every sample carries a topic id. Topic weights start at 1. At every update window (N steps, the
job's cadence) each topic t with samples in the window gets its mean per-sample loss L_t, and its
relative difficulty against the mean over topics present:

    rel_t = (L_t - mean_t' L_t') / mean_t' L_t'

    stage 1 (step < switch_step):  w_t <- min(w_t * (1 + rel_t), w_max)      for hard topics (rel_t > 0)
    stage 2 (step >= switch_step): w_t <- clip(w_t * (1 - rel_t), w_min, w_max)  for every topic:
                                   topics that stay hard are lowered (likely noisy or
                                   unlearnable), the rest raised

Defaults w_max = 5, w_min = 0.1. Workers apply topic weights to per-sample losses (instance
weighting; Decision.params["topic_weights"], indexed by topic id); the domain weights are induced
from them: w_d proportional to prior_d * (mean topic weight over domain d's samples in the window),
a domain without samples keeping its last factor. `num_topics` fixes the table's length (larger ids
are ignored); 0 lets it grow with the largest id seen (up to MAX_TOPICS). Params carry only
`topic_weights`, the instance-weighting schema (mixer.weighting.params.TopicParams).
"""

from __future__ import annotations

import numpy as np

from mixer.signals import SAMPLE_LOSS, Window
from mixer.strategies import register
from mixer.strategies.base import Decision, State, Strategy

MAX_TOPICS = 1 << 16


def toremi_step(
    weights: np.ndarray, topic_loss: np.ndarray, seen: np.ndarray, *, stage: int, w_min: float, w_max: float
) -> np.ndarray:
    """One ToReMi topic-weight update from per-topic mean losses (only `seen` topics move)."""
    w = weights.copy()
    mean = topic_loss[seen].mean()
    if mean <= 0:
        return w
    rel = (topic_loss - mean) / mean
    if stage == 1:
        hard = seen & (rel > 0)
        w[hard] = np.minimum(w[hard] * (1.0 + rel[hard]), w_max)
    else:
        w[seen] = np.clip(w[seen] * (1.0 - rel[seen]), w_min, w_max)
    return w


@register
class ToReMi(Strategy):
    name = "toremi"
    signals = frozenset({SAMPLE_LOSS})
    defaults = {"switch_step": 10_000, "w_min": 0.1, "w_max": 5.0, "num_topics": 0}

    def validate(self) -> None:
        p = self.params
        self.check(
            "switch_step",
            isinstance(p["switch_step"], int) and p["switch_step"] >= 0,
            "must be an integer >= 0",
        )
        self.check("w_min", p["w_min"] > 0, "must be > 0")
        self.check("w_max", p["w_max"] >= 1.0 and p["w_max"] > p["w_min"], "must be >= 1 and exceed w_min")
        self.check("w_min", p["w_min"] <= 1.0, "must be <= 1 (topic weights start at 1)")
        self.check(
            "num_topics",
            isinstance(p["num_topics"], int) and 0 <= p["num_topics"] <= MAX_TOPICS,
            f"must be an integer in [0, {MAX_TOPICS}] (0: grow with the topic ids seen)",
        )

    def init(self, seed: int) -> State:
        return {"topic_weights": np.ones(self.params["num_topics"]), "domain_factor": np.ones(self.K)}

    def update(self, state: State, window: Window) -> tuple[State, Decision | None]:
        loss, topic, domain = _topic_samples(window)
        p = self.params
        if loss is None:
            return state, None
        keep = topic < (p["num_topics"] or MAX_TOPICS)
        loss, topic = loss[keep], topic[keep]
        if loss.size == 0:
            return state, None
        n_topics = max(state["topic_weights"].shape[0], int(topic.max()) + 1)
        w = np.ones(n_topics)
        w[: state["topic_weights"].shape[0]] = state["topic_weights"]
        counts = np.bincount(topic, minlength=n_topics).astype(np.float64)
        sums = np.bincount(topic, weights=loss, minlength=n_topics)
        seen = counts > 0
        topic_loss = np.zeros(n_topics)
        topic_loss[seen] = sums[seen] / counts[seen]
        stage = 1 if window.step < p["switch_step"] else 2
        w = toremi_step(w, topic_loss, seen, stage=stage, w_min=p["w_min"], w_max=p["w_max"])

        factor = state["domain_factor"].copy()
        if domain is not None:
            domain = domain[keep]
            n_d = np.bincount(domain, minlength=self.K).astype(np.float64)
            s_d = np.bincount(domain, weights=w[topic], minlength=self.K)
            has = n_d > 0
            factor[has] = s_d[has] / n_d[has]
        new = {"topic_weights": w, "domain_factor": factor}
        return new, Decision(weights=self.prior * factor, params={"topic_weights": w.tolist()})


def _topic_samples(window: Window) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """(loss, topic, domain) of every sample that came with a topic id; domain is None unless all have one."""
    losses, topics, domains = [], [], []
    for r in window.reports:
        if r.sample_loss is None or r.sample_topic is None:
            continue
        losses.append(r.sample_loss)
        topics.append(r.sample_topic)
        domains.append(r.sample_domain)
    if not losses:
        return None, None, None
    domain = None if any(d is None for d in domains) else np.concatenate(domains).astype(np.int64)
    return np.concatenate(losses).astype(np.float64), np.concatenate(topics).astype(np.int64), domain
