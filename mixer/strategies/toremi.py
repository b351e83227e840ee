"""ToReMi: topic-aware data reweighting in two stages (Zhu, Gu, Zheng, Wang, Li, Feng, Xiao 2025,
"ToReMi: Topic-Aware Data Reweighting for Dynamic Pre-Training Data Selection", arXiv:2504.00695),
as the authors' code does it (zxx000728/ToReMi @ ecb763a, train/trainer.py: compute_loss,
compute_metadata_loss, adjust_weights, evaluate).

Every sample carries zero or more topic labels. Each topic k has a weight w_k (starting at 1) and,
over the current period, a loss sum S_k and a sample count N_k: a sample with several labels adds
its loss in full to every one of its topics. At each update (the job's cadence, the reference's
`steps_to_adjust_weight`):

    avg_k = S_k / N_k  (0 for a topic without samples)
    G     = mean of avg_k over the topics with samples   (unweighted: each topic counts once)
    d_k   = avg_k - G
    stage 0:  d_k > 0:  w_k <- min(w_k (1 + d_k / G), w_max)       (below-mean topics unchanged)
    stage 1:  d_k > 0:  w_k <- max(w_k (1 - d_k / G), w_min)       (still hard: likely noise)
              d_k <= 0: w_k <- min(w_k (1 + |d_k| / G), w_max)

then S and N restart. Every topic of the table moves, those without samples included (avg 0, so
in stage 1 their weight doubles, as in the reference). When G = 0 (nothing labelled in the
period) nothing changes and the sums carry on into the next period. Defaults w_min = 0.1,
w_max = 5 (the reference's MIN_WEIGHT / MAX_WEIGHT).

Stage switch: at an evaluation (a report carrying `val_loss`) after `switch_step`, provided an
earlier evaluation was seen, the stage becomes 1 for good. The reference switches at the first
evaluation with completed_steps > 7000 of its planned 8000 (pretrain.sh): the paper's test on the
validation loss' decrease rate is commented out there. So our default switch step is
`switch_fraction` (7/8) of the planned run length `total_steps`; `switch_step` sets it outright.
An evaluation report at step e stands for e completed steps (as `report_validation` sends it).

The topic weights are applied once, as the paper does: workers weight each sample's loss by the
mean of its topics' weights (mixer.weighting.topic; `Decision.params["topic_weights"]`, indexed by
topic id). The domain weights stay the prior. Ours, off by default: `domain_sampling` also moves
the domain weights to prior_d * (mean topic weight over domain d's samples of the period), which
compounds with the per-sample weights (a w-fold preference becomes a w^2-fold gradient share).

Choices that are ours: topics come from `sample_topic` (one id per sample, or a row of ids padded
with -1; ids at or beyond `num_topics` are ignored; `num_topics` 0 grows the table with the
largest id seen, up to MAX_TOPICS); the reference keeps weights per process and does not
checkpoint them, ours live in the service's state (one set per job, from the whole data-parallel
batch, restored on restart); the per-sample loss is the worker's token mean over the loss mask,
where the reference divides by the padded length (the same on Megatron's packed, unpadded
samples); an update whose window arrives without samples ships no version.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from mixer.signals import SAMPLE_LOSS, VAL_LOSS, Window
from mixer.strategies import register
from mixer.strategies.base import Decision, State, Strategy

MAX_TOPICS = 1 << 16
REFERENCE_SWITCH_FRACTION = 7000 / 8000
"""The reference's hard-coded switch (step 7000) over pretrain.sh's max_train_steps (8000)."""


def toremi_adjust(
    weights: np.ndarray,
    loss_sum: np.ndarray,
    count: np.ndarray,
    *,
    stage: int,
    w_min: float,
    w_max: float,
) -> tuple[np.ndarray, np.ndarray, float] | None:
    """One adjustment: (new weights, per-topic period means, G); None when G is 0 (no change, no reset)."""
    seen = count > 0
    avg = np.zeros_like(weights)
    avg[seen] = loss_sum[seen] / count[seen]
    if not seen.any():
        return None
    G = float(avg[seen].sum()) / int(seen.sum())
    if G == 0.0:
        return None
    d = avg - G
    w = weights.copy()
    up = d > 0
    if stage == 0:
        w[up] = np.minimum(w[up] * (1.0 + d[up] / G), w_max)
    else:
        w[up] = np.maximum(w[up] * (1.0 - d[up] / G), w_min)
        w[~up] = np.minimum(w[~up] * (1.0 + np.abs(d[~up] / G)), w_max)
    return w, avg, G


def accumulate(
    weights: np.ndarray, loss_sum: np.ndarray, count: np.ndarray, loss: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Add a batch to the period: each sample's loss, in full, to every topic of its row (-1 pads).

    The table grows to the largest id (new topics start at weight 1)."""
    sample, slot = np.nonzero(rows >= 0)
    ids = rows[sample, slot].astype(np.int64)
    if not ids.size:
        return weights, loss_sum, count
    n = max(weights.shape[0], int(ids.max()) + 1)
    weights, loss_sum, count = _grow(weights, n, 1.0), _grow(loss_sum, n, 0.0), _grow(count, n, 0)
    loss_sum = loss_sum + np.bincount(ids, weights=np.asarray(loss, dtype=np.float64)[sample], minlength=n)
    count = count + np.bincount(ids, minlength=n)
    return weights, loss_sum, count


def topic_rows(topic: np.ndarray) -> np.ndarray:
    """Topic labels as rows (samples x labels), -1 padding; one id per sample is a row of one."""
    t = np.asarray(topic, dtype=np.int64)
    return t[:, None] if t.ndim == 1 else t


@register
class ToReMi(Strategy):
    name = "toremi"
    signals = frozenset({SAMPLE_LOSS, VAL_LOSS})
    ships_weighting_params: ClassVar[frozenset[str]] = frozenset({"topic_weights"})
    """Every version's params["topic_weights"] is for the topic weighting in the trainer's loss; it
    takes precedence there over the spec's initial list (mixer.megatron.instance)."""
    defaults: ClassVar[dict[str, Any]] = {
        "switch_step": None,
        "total_steps": 0,
        "switch_fraction": REFERENCE_SWITCH_FRACTION,
        "w_min": 0.1,
        "w_max": 5.0,
        "num_topics": 0,
        "domain_sampling": False,
    }

    def validate(self) -> None:
        p = self.params
        self.check("w_min", 0 < p["w_min"] <= 1.0, "must lie in (0, 1] (topic weights start at 1)")
        self.check("w_max", 1.0 <= p["w_max"] <= 1e6, "must lie in [1, 1e6]")
        self.check(
            "num_topics",
            isinstance(p["num_topics"], int) and 0 <= p["num_topics"] <= MAX_TOPICS,
            f"must be an integer in [0, {MAX_TOPICS}] (0: grow with the topic ids seen)",
        )
        s = p["switch_step"]
        self.check(
            "switch_step",
            s is None or (isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 1 << 53),
            "must be an integer in [0, 2^53), or left out to switch at switch_fraction * total_steps",
        )
        self.check(
            "total_steps",
            isinstance(p["total_steps"], int) and 0 <= p["total_steps"] < 1 << 53,
            "must be an integer in [0, 2^53) (the planned run length; 0: not given)",
        )
        self.check("switch_fraction", 0.0 < p["switch_fraction"] <= 1.0, "must lie in (0, 1]")
        self.check(
            "total_steps",
            s is not None or p["total_steps"] > 0,
            "is needed for the default stage switch at switch_fraction * total_steps "
            "(the planned run length, as the reference's 7000 of 8000 steps); give it, or switch_step",
        )
        self.check("domain_sampling", isinstance(p["domain_sampling"], bool), "must be true or false")

    @property
    def switch_at(self) -> int:
        """The step after which an evaluation moves training to stage 1."""
        p = self.params
        if p["switch_step"] is not None:
            return int(p["switch_step"])
        return int(p["switch_fraction"] * p["total_steps"])

    def init(self, seed: int) -> State:
        n = self.params["num_topics"]
        return {
            "topic_weights": np.ones(n),
            "period_sum": np.zeros(n),
            "period_count": np.zeros(n, dtype=np.int64),
            "stage": 0,
            "evaluated": False,
            "domain_factor": np.ones(self.K),
        }

    def update(self, state: State, window: Window) -> tuple[State, Decision | None]:
        p = self.params
        limit = p["num_topics"] or MAX_TOPICS
        w, S, N = state["topic_weights"], state["period_sum"], state["period_count"]
        stage, evaluated = int(state["stage"]), bool(state["evaluated"])
        labelled: list[tuple[np.ndarray, np.ndarray]] = []  # (topic rows, domains) for the variant
        for r in window.reports:
            if r.val_loss is not None:
                if evaluated and r.step > self.switch_at:
                    stage = 1
                evaluated = True
            if r.sample_loss is None or r.sample_topic is None:
                continue
            rows = topic_rows(r.sample_topic)
            rows = np.where((rows >= 0) & (rows < limit), rows, -1)
            w, S, N = accumulate(w, S, N, r.sample_loss, rows)
            if r.sample_domain is not None:
                labelled.append((rows, r.sample_domain.astype(np.int64)))
        new = {**state, "stage": stage, "evaluated": evaluated}
        adjusted = toremi_adjust(w, S, N, stage=stage, w_min=p["w_min"], w_max=p["w_max"])
        if adjusted is None:
            new.update(topic_weights=w, period_sum=S, period_count=N)
            return new, None
        w_new = adjusted[0]
        new.update(topic_weights=w_new, period_sum=np.zeros_like(S), period_count=np.zeros_like(N))
        weights = self.prior
        if p["domain_sampling"]:
            factor = state["domain_factor"].copy()
            d_sum, d_n = np.zeros(self.K), np.zeros(self.K)
            for rows, domain in labelled:
                valid = rows >= 0
                has = valid.any(axis=1)
                u = np.where(valid, w_new[np.maximum(rows, 0)], 0.0).sum(axis=1)[has] / valid.sum(axis=1)[has]
                d_sum += np.bincount(domain[has], weights=u, minlength=self.K)
                d_n += np.bincount(domain[has], minlength=self.K)
            seen = d_n > 0
            factor[seen] = d_sum[seen] / d_n[seen]
            new["domain_factor"] = factor
            weights = self.prior * factor
        return new, Decision(weights=weights, params={"topic_weights": w_new.tolist()})


def _grow(a: np.ndarray, n: int, fill: float) -> np.ndarray:
    if a.shape[0] >= n:
        return a
    out = np.full(n, fill, dtype=a.dtype)
    out[: a.shape[0]] = a
    return out
