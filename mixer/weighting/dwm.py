"""DWM, a learned data weighting model (Yu, Han, Zhou, Tang, Huang, Wang, Tao, ICML 2025,
"LLM Data Selection and Utilization via Dynamic Bi-level Optimization", arXiv:2507.16178).

A weighting model with parameters phi gives each sample of a batch a relative weight; the LLM
(parameters theta) trains on the weighted loss, and phi is trained so that the LLM's validation
loss falls. The paper's bi-level problem:

    min_phi  L_val(theta*(phi))     theta*(phi) = argmin_theta (1/N) sum_i w_i(phi) l_i(theta)

With one-step unrolling, theta' = theta - eta (1/N) sum_i w_i grad l_i, and the chain rule gives
the upper-level gradient from per-sample scalars alone:

    s_i = <grad l_i(theta), grad L_val(theta)>            (the worker measures these)
    L_val(theta') ~= L_val(theta) - eta/N sum_i w_i(phi) s_i
    dL_val/dphi   ~= -eta sum_i s_i dw_i/dphi              (1/N folded into eta)

so the service trains phi by autograd on the surrogate J(phi) = -eta sum_i s_i w_i(phi), with s
held constant. Here the weighting model is a one-hidden-layer MLP over per-sample features (a
compact stand-in for the paper's model over the samples themselves):

    z_i = softsign(x_i W1 + b1) . w2    w_i = N softmax(z)_i        (sum_i w_i = N)

softsign(a) = a / (1 + |a|): bounded like tanh, so one huge loss cannot blow a score up and
collapse the softmax (ReLU did, in the corrupted-label test), yet a third of tanh's CPU cost.

Features x_i (see `FeatureBuilder`): loss, loss minus its domain's running mean, tokens/seq_len,
training progress, domain one-hot, topic multi-hot. The output layer starts at zero so a fresh
model gives exactly uniform weights. Parameters are a flat dict of numpy arrays (float32): the
MLP ("W1", "b1", "w2") and, once trained, the optimiser state ("opt.t", "opt.m.W1", ...). They
travel as safetensors bytes with the feature layout in the header, never as pickle.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import safetensors.numpy
import torch

from mixer.weighting.distributed import gather_batch
from mixer.weighting.params import DwmParams

MLP_KEYS = ("W1", "b1", "w2")
FORMAT = "mixer.dwm/1"
FIXED_FEATURES = 4  # loss, relative loss, length, progress

Params = dict[str, np.ndarray]


def init_params(num_features: int, hidden: int = 32, seed: int = 0) -> Params:
    """A fresh weighting model; its zero output layer gives uniform weights until trained."""
    if num_features < 1 or hidden < 1:
        raise ValueError(f"num_features and hidden must be >= 1, got {num_features} and {hidden}")
    rng = np.random.Generator(np.random.PCG64(seed))
    bound = 1.0 / math.sqrt(num_features)
    return {
        "W1": rng.uniform(-bound, bound, (num_features, hidden)).astype(np.float32),
        "b1": np.zeros(hidden, dtype=np.float32),
        "w2": np.zeros(hidden, dtype=np.float32),
    }


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
    """The MLP tensors on `device` (do this once per version on the worker, not every step)."""
    return {k: torch.as_tensor(params[k]).to(device=device, dtype=dtype) for k in MLP_KEYS}


def _scores(p: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.softsign(torch.addmm(p["b1"], x, p["W1"])) @ p["w2"]


def evaluate(params: Mapping[str, Any], features: torch.Tensor, *, group: Any = None) -> torch.Tensor:
    """Detached weights of this rank's samples, softmax over the global batch times its size."""
    with torch.no_grad():
        x = features.detach().to(torch.promote_types(features.dtype, torch.float32))
        ready = all(
            isinstance(params[k], torch.Tensor)
            and params[k].device == x.device
            and params[k].dtype == x.dtype
            for k in MLP_KEYS
        )
        p = params if ready else to_torch(params, x.device, x.dtype)
        _check_shape(x, p["W1"].shape[0])
        full, start = gather_batch(_scores(p, x), group)
        # NaN/Inf in any feature reaches the score (softsign(inf) is NaN). Checked after the
        # gather, so every rank raises together instead of one leaving the others in a collective.
        if not bool(torch.isfinite(full).all()):
            bad = torch.nonzero(~torch.isfinite(full))[0].item()
            raise ValueError(
                f"features of global sample {bad} contain NaN or Inf; per-sample losses must be finite"
            )
        w = torch.softmax(full, dim=0) * full.numel()
        return w[start : start + x.shape[0]]


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
    x = torch.as_tensor(features).detach().to(torch.float32)
    s = torch.as_tensor(s).detach().to(torch.float32).reshape(-1)
    _check_features(x, params["W1"].shape[0])
    if s.shape[0] != x.shape[0] or not bool(torch.isfinite(s).all()):
        raise ValueError(
            f"s must hold {x.shape[0]} finite alignment scores, one per feature row; "
            f"got shape {tuple(s.shape)}"
        )
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    phi = {k: torch.tensor(np.asarray(params[k], dtype=np.float32), requires_grad=True) for k in MLP_KEYS}
    w = torch.softmax(_scores(phi, x), dim=0) * x.shape[0]
    # The one-step-unrolled validation loss, up to a constant in phi.
    surrogate = -eta * (s * w).sum()
    grads = torch.autograd.grad(surrogate, [phi[k] for k in MLP_KEYS])
    out: Params = {k: np.array(v, copy=True) for k, v in params.items()}
    if optimizer == "sgd":
        for k, g in zip(MLP_KEYS, grads):
            out[k] = (phi[k].detach() - lr * g).numpy().astype(np.float32)
        return out
    b1, b2 = betas
    t = int(np.asarray(params.get("opt.t", 0))) + 1
    out["opt.t"] = np.array(t, dtype=np.int64)
    for k, g in zip(MLP_KEYS, grads):
        m = b1 * torch.as_tensor(params.get(f"opt.m.{k}", np.zeros_like(params[k]))) + (1 - b1) * g
        v = b2 * torch.as_tensor(params.get(f"opt.v.{k}", np.zeros_like(params[k]))) + (1 - b2) * g * g
        step = lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        out[k] = (phi[k].detach() - step).numpy().astype(np.float32)
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
    tensors = {k: np.ascontiguousarray(params[k], dtype=np.float32) for k in MLP_KEYS}
    if include_optimizer:
        # np.array, not ascontiguousarray: the latter turns the 0-d step counter into shape (1,).
        tensors |= {k: np.array(v, order="C") for k, v in params.items() if k.startswith("opt.")}
    meta = {
        "format": FORMAT,
        "num_features": str(params["W1"].shape[0]),
        "hidden": str(params["W1"].shape[1]),
    }
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
    missing = [k for k in MLP_KEYS if k not in tensors]
    if missing:
        raise ValueError(f"DWM blob lacks tensor(s) {', '.join(missing)}")
    f, h = tensors["W1"].shape if tensors["W1"].ndim == 2 else (-1, -1)
    if (
        tensors["b1"].shape != (h,)
        or tensors["w2"].shape != (h,)
        or not all(np.isfinite(tensors[k]).all() for k in MLP_KEYS)
    ):
        raise ValueError(
            "DWM blob has inconsistent shapes or non-finite values: need W1 (F, H), b1 (H,), w2 (H,)"
        )
    params = {k: v for k, v in tensors.items() if not k.startswith("features.")}
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
