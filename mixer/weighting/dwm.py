"""DWM, the Data Weighting Model (Yu, Han, Zhou, Tang, Huang, Wang, Tao, ICML 2025, "LLM Data
Selection and Utilization via Dynamic Bi-level Optimization", arXiv:2507.16178), worker and service
functions.

The paper's method, as this module implements it:

- A weighting model with parameters phi gives each selected sample of a batch a weight relative
  to the other samples of that batch; the LLM (parameters theta) trains on the weighted sum of
  the samples' losses with the weighting model frozen.
- phi is trained so that the validation loss of the LLM trained with those weights falls: the
  bi-level problem

      min_phi  L_val(theta*(phi))     theta*(phi) = argmin_theta (1/N) sum_i w_i(phi) l_i(theta)

  solved by alternating the two levels, with the upper-level gradient from the chain rule
  through one unrolled lower-level step theta'(phi) = theta - eta (1/N) sum_i w_i(phi) grad l_i(theta):

      dL_val(theta')/dphi = sum_i (dL_val(theta')/dw_i) dw_i/dphi
                          = -(eta/N) sum_i <grad l_i(theta), grad L_val(theta')> dw_i/dphi

  so per-sample scalars s_i = <grad l_i(theta), grad L_val(theta')> are all the service needs
  (workers measure them: `sample_align`); `upper_gradient` is this sum, taken by autograd on the
  surrogate J(phi) = -eta sum_i s_i w_i(phi) with s held constant (1/N folded into eta).
- The weighting model is learned in stages and transfers: a model learned with one LLM can
  weight the batches of another (a larger one, or another data selection); `initial_model`
  starts a job from an exported model (`weighting.params.init_from`).

Weighting models (`weighting.params.model`):

- batch-context (default): a sample is weighted in the company of its batch. With x_i the
  features of sample i of a global batch of N (see `FeatureBuilder`),

      e_i = softsign(x_i W1 + b1)                  per-sample embedding          (H)
      c   = (1/N) sum_j e_j                        the batch, pooled             (H)
      h_i = softsign(e_i W2 + c U + b2)            the sample within its batch   (H)
      z_i = h_i . w2
      w_i = N exp(z_i) / sum_j exp(z_j)            in-batch normalisation: sum_i w_i = N

  so a sample's weight depends on the other samples of the same batch (their joint effect on
  the update), not on the sample alone, and weights are relative within the batch.
- mlp-features: the earlier per-sample model, z_i = softsign(x_i W1 + b1) . w2, same
  normalisation; kept so that specs naming it and recorded jobs replay unchanged.

Choices that are ours:
- Inputs: per-sample statistics both sides can rebuild from what workers report (loss, loss
  minus its domain's running mean, tokens/seq_len, training progress, domain one-hot, topic
  multi-hot), not token content: the service that trains phi sees reports, never text. These
  inputs do not depend on the LLM's width or depth, which is what lets a model move between
  LLM sizes.
- The batch-context layer (mean-pooled set context, Zaheer et al. 2017, "Deep Sets") over
  attention between samples: O(N H) at any batch size, one all-reduce of H+1 numbers per step
  under data parallelism instead of gathering every sample's embedding.
- softsign (a / (1 + |a|)) as the nonlinearity: bounded like tanh, so one huge loss cannot
  blow a score up and collapse the softmax, at a third of tanh's CPU cost.
- Output layer w2 starts at zero, so a fresh model gives exactly uniform weights.
- The service trains phi with Adam (or SGD) on the surrogate, one step per reported batch.
- A transferred model brings its tensors only: the feature running means restart with the new
  job (another LLM has other loss levels), and so does the optimiser state.

Parameters are a flat dict of float32 numpy arrays (the model's tensors and, once trained, the
optimiser state "opt.t", "opt.m.<key>", "opt.v.<key>"). They travel as safetensors bytes with the
feature layout in the header, never as pickle.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import safetensors.numpy
import torch

from mixer.weighting.distributed import gather_batch, sum_over_ranks
from mixer.weighting.params import DWM_FIXED_FEATURES, DWM_MODELS, DwmParams

MLP_KEYS = ("W1", "b1", "w2")
BATCH_KEYS = ("W1", "b1", "W2", "U", "b2", "w2")
MODEL_KEYS = {"batch-context": BATCH_KEYS, "mlp-features": MLP_KEYS}
DEFAULT_MODEL = DWM_MODELS[0]
FORMAT = "mixer.dwm/1"
FIXED_FEATURES = DWM_FIXED_FEATURES  # loss, relative loss, length, progress

Params = dict[str, np.ndarray]


def model_of(params: Mapping[str, Any]) -> str:
    """Which weighting model a parameter dict holds (the batch-context model has a context matrix U)."""
    return "batch-context" if "U" in params else "mlp-features"


def model_keys(params: Mapping[str, Any]) -> tuple[str, ...]:
    return MODEL_KEYS[model_of(params)]


def init_params(num_features: int, hidden: int = 32, seed: int = 0, model: str = DEFAULT_MODEL) -> Params:
    """A fresh weighting model; its zero output layer gives uniform weights until trained."""
    if num_features < 1 or hidden < 1:
        raise ValueError(f"num_features and hidden must be >= 1, got {num_features} and {hidden}")
    if model not in MODEL_KEYS:
        raise ValueError(f"model must be one of {', '.join(MODEL_KEYS)}, got {model!r}")
    rng = np.random.Generator(np.random.PCG64(seed))
    bound = 1.0 / math.sqrt(num_features)
    # W1 is drawn first for both models, so the mlp-features model is what it always was.
    out = {
        "W1": rng.uniform(-bound, bound, (num_features, hidden)).astype(np.float32),
        "b1": np.zeros(hidden, dtype=np.float32),
    }
    if model == "batch-context":
        inner = 1.0 / math.sqrt(hidden)
        out["W2"] = rng.uniform(-inner, inner, (hidden, hidden)).astype(np.float32)
        out["U"] = rng.uniform(-inner, inner, (hidden, hidden)).astype(np.float32)
        out["b2"] = np.zeros(hidden, dtype=np.float32)
    out["w2"] = np.zeros(hidden, dtype=np.float32)
    return out


def _check_shape(features: torch.Tensor, num_features: int) -> None:
    if features.ndim != 2 or features.shape[0] == 0 or features.shape[1] != num_features:
        raise ValueError(
            f"features must have shape (batch >= 1, {num_features}) for this weighting model, "
            f"got {tuple(features.shape)}"
        )


def _check_features(features: torch.Tensor, num_features: int) -> None:
    _check_shape(features, num_features)
    # One scalar reduction: NaN and Inf propagate through a sum, an elementwise check costs 10x more.
    if not bool(torch.isfinite(features.sum())):
        bad = torch.nonzero(~torch.isfinite(features))
        if bad.numel() == 0:
            raise ValueError("features are too large to sum in their dtype; per-sample losses look corrupt")
        raise ValueError(
            f"features of sample {bad[0, 0].item()} contain NaN or Inf; per-sample losses must be finite"
        )


def to_torch(
    params: Mapping[str, Any], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> dict:
    """The model's tensors on `device` (do this once per version on the worker, not every step)."""
    return {k: torch.as_tensor(params[k]).to(device=device, dtype=dtype) for k in model_keys(params)}


def _scores(p: Mapping[str, torch.Tensor], x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """z_i for this rank's rows; the batch context c pools the global batch (all ranks)."""
    e = torch.nn.functional.softsign(torch.addmm(p["b1"], x, p["W1"]))
    if "U" not in p:
        return e @ p["w2"]
    # Sum and count in one all-reduce: c is the mean embedding over the global batch.
    pooled = torch.cat([e.sum(dim=0), e.new_full((1,), float(e.shape[0]))])
    pooled = sum_over_ranks(pooled, group)
    c = pooled[:-1] / pooled[-1]
    h = torch.nn.functional.softsign(torch.addmm(p["b2"] + c @ p["U"], e, p["W2"]))
    return h @ p["w2"]


def in_batch_weights(scores: torch.Tensor) -> torch.Tensor:
    """w_i = N softmax(z)_i over the (global) batch: relative weights with mean 1."""
    return torch.softmax(scores, dim=0) * scores.numel()


def evaluate(params: Mapping[str, Any], features: torch.Tensor, *, group: Any = None) -> torch.Tensor:
    """Detached weights of this rank's samples, softmax over the global batch times its size."""
    with torch.no_grad():
        x = features.detach().to(torch.promote_types(features.dtype, torch.float32))
        ready = all(
            isinstance(params[k], torch.Tensor)
            and params[k].device == x.device
            and params[k].dtype == x.dtype
            for k in model_keys(params)
        )
        p = params if ready else to_torch(params, x.device, x.dtype)
        _check_shape(x, p["W1"].shape[0])
        full, start = gather_batch(_scores(p, x, group), group)
        # NaN/Inf in any feature reaches the score (softsign(inf) is NaN; through the batch context
        # it reaches every score). Checked after the gather, so every rank raises together instead
        # of one leaving the others in a collective.
        if not bool(torch.isfinite(full).all()):
            bad = torch.nonzero(~torch.isfinite(full))[0].item()
            if "U" in p:
                # The batch context spreads one bad row to every score: name the row itself.
                rows = torch.nonzero(~torch.isfinite(x).all(dim=1))
                where = (
                    f"global sample {start + rows[0].item()}" if rows.numel() else "a sample on another rank"
                )
            else:
                where = f"global sample {bad}"
            raise ValueError(f"features of {where} contain NaN or Inf; per-sample losses must be finite")
        return in_batch_weights(full)[start : start + x.shape[0]]


def upper_gradient(
    params: Mapping[str, Any], features: torch.Tensor, s: torch.Tensor, eta: float
) -> dict[str, torch.Tensor]:
    """dL_val(theta'(phi))/dphi from the batch's s_i = <grad l_i(theta), grad L_val(theta')>:
    the gradient of J(phi) = -eta sum_i s_i w_i(phi), s held constant (module docstring).

    `features` (float32 or float64) are the rows the batch was weighted with, one per s_i; the
    gradient comes back in the features' dtype, keyed like the model's tensors.
    """
    x = torch.as_tensor(features).detach()
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    s = torch.as_tensor(s).detach().to(x.dtype).reshape(-1)
    _check_features(x, params["W1"].shape[0])
    if s.shape[0] != x.shape[0] or not bool(torch.isfinite(s).all()):
        raise ValueError(
            f"s must hold {x.shape[0]} finite alignment scores, one per feature row; "
            f"got shape {tuple(s.shape)}"
        )
    keys = model_keys(params)
    phi = {k: torch.tensor(np.asarray(params[k]), dtype=x.dtype, requires_grad=True) for k in keys}
    w = in_batch_weights(_scores(phi, x))
    # The one-step-unrolled validation loss, up to a constant in phi.
    surrogate = -eta * (s * w).sum()
    return dict(zip(keys, torch.autograd.grad(surrogate, [phi[k] for k in keys])))


def train_step(
    params: Mapping[str, np.ndarray],
    features: torch.Tensor,
    s: torch.Tensor,
    eta: float,
    lr: float,
    *,
    optimizer: str = "adam",
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> Params:
    """One update of phi from alignment scores s_i; returns new params (inputs are not modified).

    `features` are the ones the batch was weighted with, `s` the worker's per-sample
    <grad l_i, grad L_val>. The optimiser state rides along in the returned dict.
    """
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    x = torch.as_tensor(features).detach().to(torch.float32)
    grads = upper_gradient(params, x, s, eta)
    out: Params = {k: np.array(v, copy=True) for k, v in params.items()}
    current = {k: torch.as_tensor(np.asarray(params[k], dtype=np.float32)) for k in grads}
    if optimizer == "sgd":
        for k, g in grads.items():
            out[k] = (current[k] - lr * g).numpy().astype(np.float32)
        return out
    b1, b2 = betas
    t = int(np.asarray(params.get("opt.t", 0))) + 1
    out["opt.t"] = np.array(t, dtype=np.int64)
    for k, g in grads.items():
        m = b1 * torch.as_tensor(params.get(f"opt.m.{k}", np.zeros_like(params[k]))) + (1 - b1) * g
        v = b2 * torch.as_tensor(params.get(f"opt.v.{k}", np.zeros_like(params[k]))) + (1 - b2) * g * g
        step = lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        out[k] = (current[k] - step).numpy().astype(np.float32)
        out[f"opt.m.{k}"] = m.numpy().astype(np.float32)
        out[f"opt.v.{k}"] = v.numpy().astype(np.float32)
    return out


@dataclass(slots=True)
class FeatureBuilder:
    """Per-sample features of the weighting model; its state is one running mean per domain.

    The service owns the state (`update` on reported losses) and ships it in the blob, so the
    worker builds exactly the features the model is trained on.
    """

    num_domains: int
    num_topics: int = 0
    seq_len: int = 4096
    total_steps: int = 100_000
    momentum: float = 0.9
    domain_mean: np.ndarray = field(default=None)  # type: ignore[assignment]
    """Running mean loss per domain (float64, K)."""
    domain_seen: np.ndarray = field(default=None)  # type: ignore[assignment]
    """Whether a domain has been seen yet (bool, K); an unseen domain's relative loss is 0."""

    def __post_init__(self) -> None:
        if self.domain_mean is None:
            self.domain_mean = np.zeros(self.num_domains, dtype=np.float64)
        if self.domain_seen is None:
            self.domain_seen = np.zeros(self.num_domains, dtype=bool)

    @classmethod
    def from_params(cls, num_domains: int, params: DwmParams) -> FeatureBuilder:
        return cls(num_domains, params.num_topics, params.seq_len, params.total_steps, params.momentum)

    @property
    def num_features(self) -> int:
        return FIXED_FEATURES + self.num_domains + self.num_topics

    def _domains(self, domains: Any, n: int, device: torch.device) -> torch.Tensor:
        d = torch.as_tensor(domains, device=device).reshape(-1).long()
        if d.shape[0] != n:
            raise ValueError(f"domains has {d.shape[0]} entries for {n} losses")
        if n and (int(d.min()) < 0 or int(d.max()) >= self.num_domains):
            raise ValueError(
                f"domain ids must lie in [0, {self.num_domains}), got range [{int(d.min())}, {int(d.max())}]"
            )
        return d

    def update(self, losses: Any, domains: Any) -> None:
        """Fold a batch's per-domain mean losses into the running means (EMA with `momentum`)."""
        l = torch.as_tensor(losses).detach().to("cpu", torch.float64).reshape(-1)
        if not bool(torch.isfinite(l).all()):
            raise ValueError("losses contain NaN or Inf; running domain means take finite losses only")
        d = self._domains(domains, l.shape[0], l.device)
        total = torch.zeros(self.num_domains, dtype=torch.float64).index_add_(0, d, l).numpy()
        count = np.bincount(d.numpy(), minlength=self.num_domains)
        present = count > 0
        batch_mean = np.where(present, total / np.maximum(count, 1), 0.0)
        blended = self.momentum * self.domain_mean + (1 - self.momentum) * batch_mean
        # A domain's first batch sets its mean outright: an EMA from 0 would lag for many steps.
        new = np.where(self.domain_seen, blended, batch_mean)
        self.domain_mean = np.where(present, new, self.domain_mean)
        self.domain_seen = self.domain_seen | present

    def build(
        self, losses: torch.Tensor, domains: Any, step: int, *, topics: Any = None, lengths: Any = None
    ) -> torch.Tensor:
        """Feature rows (batch, num_features) on the losses' device; lengths None means full sequences."""
        l = losses.detach().reshape(-1)
        l = l.to(torch.promote_types(l.dtype, torch.float32))
        n, dev, K = l.shape[0], l.device, self.num_domains
        d = self._domains(domains, n, dev)
        # Filled in place: one allocation instead of a stack, a one-hot and a cat per step.
        out = torch.zeros(n, self.num_features, dtype=l.dtype, device=dev)
        out[:, 0] = l
        mean = torch.as_tensor(self.domain_mean, device=dev, dtype=l.dtype)[d]
        seen = torch.as_tensor(self.domain_seen, device=dev)[d]
        out[:, 1] = (l - mean) * seen
        out[:, 2] = (
            1.0
            if lengths is None
            else torch.as_tensor(lengths, device=dev).reshape(-1).to(l.dtype) / self.seq_len
        )
        out[:, 3] = min(max(step, 0) / self.total_steps, 1.0)
        out.scatter_(1, (FIXED_FEATURES + d).unsqueeze(1), 1.0)
        if self.num_topics and topics is not None:
            t = torch.as_tensor(topics, device=dev).long()
            t = t.unsqueeze(1) if t.ndim == 1 else t
            if t.shape[0] != n or (t.numel() and int(t.min()) < -1):
                raise ValueError(f"topics must have {n} rows of ids >= 0 padded with -1")
            # Each known topic of a sample gets an equal share; pads and ids beyond num_topics
            # (as in topic.py: no reason to stop training) add a zero share to column 0.
            valid = ((t >= 0) & (t < self.num_topics)).to(l.dtype)
            share = valid / valid.sum(dim=1, keepdim=True).clamp(min=1)
            out.scatter_add_(1, FIXED_FEATURES + K + t.clamp(0, self.num_topics - 1), share)
        return out

    def config(self) -> dict[str, Any]:
        return {
            k: getattr(self, k) for k in ("num_domains", "num_topics", "seq_len", "total_steps", "momentum")
        }

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"domain_mean": self.domain_mean.copy(), "domain_seen": self.domain_seen.copy()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        mean, seen = np.asarray(state["domain_mean"], np.float64), np.asarray(state["domain_seen"], bool)
        if mean.shape != (self.num_domains,) or seen.shape != (self.num_domains,):
            raise ValueError(
                f"feature state is for {mean.shape[0]} domains; this builder has {self.num_domains}"
            )
        self.domain_mean, self.domain_seen = mean.copy(), seen.copy()


def weights_for_step(
    step: int,
    losses: torch.Tensor,
    domains: torch.Tensor,
    params: Mapping[str, Any],
    builder: FeatureBuilder,
    *,
    topics: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    group: Any = None,
) -> torch.Tensor:
    """Worker side: this rank's weights for step `step` from the current version's model and features."""
    return evaluate(params, builder.build(losses, domains, step, topics=topics, lengths=lengths), group=group)


@dataclass(slots=True)
class SampleBatch:
    """One reported batch with alignment scores, as the service receives it."""

    step: int
    losses: Any
    domains: Any
    s: Any
    """Per-sample <grad l_i, grad L_val>."""
    topics: Any = None
    lengths: Any = None


def service_update(
    params: Mapping[str, np.ndarray],
    builder: FeatureBuilder,
    config: DwmParams,
    batches: Sequence[SampleBatch],
) -> Params:
    """Service side, one update window: train phi on every batch, then advance the running means.

    Features are built with the builder as last published, i.e. as the worker built them; only
    after training do the window's losses enter the means, ready to ship with the new version.
    """
    new = dict(params)
    for b in batches:
        x = builder.build(torch.as_tensor(b.losses), b.domains, b.step, topics=b.topics, lengths=b.lengths)
        new = train_step(new, x, torch.as_tensor(b.s), config.eta, config.lr, optimizer=config.optimizer)
    for b in batches:
        builder.update(b.losses, b.domains)
    return new


def to_bytes(
    params: Mapping[str, np.ndarray],
    builder: FeatureBuilder | None = None,
    *,
    include_optimizer: bool = False,
) -> bytes:
    """safetensors bytes of the model (and optimiser state if asked); the feature layout is in the header."""
    model = model_of(params)
    tensors = {k: np.ascontiguousarray(params[k], dtype=np.float32) for k in MODEL_KEYS[model]}
    if include_optimizer:
        # np.array, not ascontiguousarray: the latter turns the 0-d step counter into shape (1,).
        tensors |= {k: np.array(v, order="C") for k, v in params.items() if k.startswith("opt.")}
    meta = {
        "format": FORMAT,
        "num_features": str(params["W1"].shape[0]),
        "hidden": str(params["W1"].shape[1]),
    }
    if model != "mlp-features":
        # mlp-features blobs carry no "model" entry: their bytes stay those of recorded jobs.
        meta["model"] = model
    if builder is not None:
        tensors["features.domain_mean"] = builder.domain_mean.astype(np.float64)
        tensors["features.domain_seen"] = builder.domain_seen.astype(np.uint8)
        meta["features"] = json.dumps(builder.config(), sort_keys=True)
    return safetensors.numpy.save(tensors, metadata=meta)


def from_bytes(data: bytes) -> tuple[Params, FeatureBuilder | None]:
    """Inverse of `to_bytes`: (params, feature builder or None); raises ValueError on a bad blob."""
    try:
        size = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
        tensors = safetensors.numpy.load(data)
    except Exception as e:  # noqa: BLE001 - any parse failure means the same thing to the caller
        raise ValueError(f"not a DWM blob (safetensors could not be read): {e}") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"blob format is {meta.get('format')!r}; expected {FORMAT!r}")
    model = meta.get("model", "mlp-features")
    if model not in MODEL_KEYS:
        raise ValueError(f"DWM blob holds model {model!r}; known models: {', '.join(MODEL_KEYS)}")
    keys = MODEL_KEYS[model]
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise ValueError(f"DWM blob ({model}) lacks tensor(s) {', '.join(missing)}")
    f, h = tensors["W1"].shape if tensors["W1"].ndim == 2 else (-1, -1)
    shapes = {"W1": (f, h), "b1": (h,), "W2": (h, h), "U": (h, h), "b2": (h,), "w2": (h,)}
    if any(tensors[k].shape != shapes[k] for k in keys) or not all(
        np.isfinite(tensors[k]).all() for k in keys
    ):
        want = ", ".join(
            f"{k} {('F', 'H') if k == 'W1' else ('H', 'H') if len(shapes[k]) == 2 else ('H',)}" for k in keys
        )
        raise ValueError(f"DWM blob ({model}) has inconsistent shapes or non-finite values: need {want}")
    params = {
        k: v
        for k, v in tensors.items()
        if k in keys or k == "opt.t" or (k.startswith("opt.") and k.split(".")[-1] in keys)
    }
    builder = None
    if "features" in meta:
        try:
            builder = FeatureBuilder(**json.loads(meta["features"]))
            builder.load_state_dict(
                {
                    "domain_mean": tensors["features.domain_mean"],
                    "domain_seen": tensors["features.domain_seen"],
                }
            )
        except (TypeError, KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"DWM blob has a malformed feature layout: {e}") from None
        if builder.num_features != f:
            raise ValueError(f"feature layout gives {builder.num_features} features but W1 takes {f}")
    return params, builder


def to_base64(blob: bytes) -> str:
    """The text form `weighting.params.init_from` takes."""
    return base64.b64encode(blob).decode("ascii")


def initial_model(config: DwmParams, num_domains: int, seed: int) -> tuple[Params, FeatureBuilder]:
    """The model a job starts from, and its feature builder: the `init_from` model if the spec gives
    one (its tensors only: features and optimiser start fresh), else a fresh model from the seed.

    The transferred model's architecture and width are the blob's; its feature count must equal
    this job's (4 + domains + num_topics), or a ValueError names both.
    """
    builder = FeatureBuilder.from_params(num_domains, config)
    if not config.init_from:
        return init_params(builder.num_features, config.hidden, seed, model=config.model), builder
    try:
        blob = base64.b64decode(config.init_from, validate=True)
    except ValueError:
        raise ValueError("weighting.params.init_from is not base64") from None
    params, source = from_bytes(blob)
    f = params["W1"].shape[0]
    if f != builder.num_features:
        raise ValueError(
            f"weighting.params.init_from holds a model of {f} features; this job's features are "
            f"{builder.num_features} (4 + {num_domains} domains + {config.num_topics} topics)"
        )
    if source is not None and (source.num_domains, source.num_topics) != (num_domains, config.num_topics):
        raise ValueError(
            f"weighting.params.init_from was trained on {source.num_domains} domains and "
            f"{source.num_topics} topics; this job has {num_domains} and {config.num_topics}"
        )
    return {k: np.array(params[k], dtype=np.float32) for k in model_keys(params)}, builder
