"""Self-influence guided sample reweighting (PRESENCE: Thakkar, Bolukbasi, Ganapathy, Vashishth,
Chandar, Talukdar, EMNLP 2023, "Self-Influence Guided Data Reweighting for Language Model
Pre-training", arXiv:2311.00913).

Section 3 of the paper (PRESENCE-Sequential) filters data with a separately trained scoring
model; this module is the joint, online method of Section 4.1 (PRESENCE).

Self-influence. TracIn (Pruthi et al. 2020) scores the influence of a training sample z on itself
as SI(z) = sum_k eta_k ||grad l(theta_k, z)||^2 over saved checkpoints theta_k. PRESENCE makes it
online: the score of a sample in the step's minibatch is taken at the step's own parameters,

    s_i = ||grad_theta' l_i(theta_t)||^2

with theta' the parameters the gradient is restricted to (the paper restricts it to the first and
last layers so that the score stays cheap).

Reweighting. Within a minibatch of N samples the scores go through a softmax with temperature tau
and the training loss is the weighted sum of the sample losses:

    w_i = N exp(s_i / tau) / sum_j exp(s_j / tau)          L = sum_i w_i l_i / N

(on a worker, mixer.megatron.loss.compute_loss applies w_i to each sample's loss sum over the
global token count, as for the other instance weightings).

Two stages: first tau > 0 (stage 1, `tau_1`), which favours high self-influence samples (novelty);
from step `switch_step` on tau < 0 (stage 2, `tau_2`), which damps them (stability: high
self-influence also marks noisy and corrupted samples).

Choices that are ours:

- The unit. Weights are per sample, the formulation of Section 4.1; the paper's large-scale runs
  reweight whole micro-batches instead, which this module does not do.
- The layer. theta' is the output layer's weight (and its bias when it has one): the last of
  the paper's two layers, alone. The first (embedding) layer's per-sample gradient needs a backward pass through
  the whole network per sample before the step's weights exist; the output layer's has an exact
  closed form from the forward pass alone (`output_layer_self_influence`): with h_t the output
  layer's input at token t, p_t = softmax(W h_t), y_t the label, m_t the loss mask and
  n_i = max(sum_t m_t, 1),

      grad_W l_i = (1/n_i) sum_t m_t (p_t - e_{y_t}) h_t^T = D_i^T H_i / n_i
      s_i = ||D_i^T H_i||_F^2 / n_i^2 = sum_{t,u} (D_i D_i^T)_{tu} (H_i H_i^T)_{tu} / n_i^2

  (D_i: the rows m_t (p_t - e_{y_t}), H_i: the rows h_t). The per-token product ||delta_t||^2
  ||h_t||^2 is only the diagonal t = u of the last sum; the cross terms are kept, so s_i equals
  autograd's per-sample gradient norm exactly. The cheaper of the two forms is used per batch:
  the [V, H] product (s V H multiply-adds per sample) or the two Gram matrices (s^2 (V + H)).
- The sample loss l_i is the token mean over the sample's loss tokens, as in the rest of mixer;
  the learning rate eta_t of TracIn's sum is dropped (one checkpoint: it only rescales tau).
- The weights are normalised to sum to the global batch size N (not 1), so that uniform scores
  give weight 1 and the loss keeps the scale of the unweighted one, like mixer's other instance
  weightings. The softmax runs over the all-gathered data-parallel batch.
- The paper applies the softmax to the raw scores (`normalize: none`, the default). `normalize:
  mean` divides the scores by the batch mean first, which makes tau independent of the scale of
  the gradient norms (they shrink by orders of magnitude over training).
- Defaults tau_1 = 1, tau_2 = -1, switch_step = 1000 are ours; give the run's own values.
- Weights are detached constants of the step (no gradient flows through the scores). The
  worker path computes them without a host sync; a non-finite score gives a non-finite loss that
  the step's statistics show one step later. `presence_weights(..., check=True)` raises instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from mixer.weighting.distributed import gather_batch
from mixer.weighting.params import PresenceParams

__all__ = [
    "output_layer_self_influence",
    "output_layer_self_influence_np",
    "presence_weights",
    "presence_weights_np",
    "temperature",
    "weights_for_step",
]


def _check_scores(scores: Tensor) -> None:
    if scores.ndim != 1:
        raise ValueError(
            f"scores must be a 1-D tensor of per-sample self-influence, got shape {tuple(scores.shape)}"
        )
    if scores.numel() == 0:
        raise ValueError("scores is empty; presence weighting needs at least one sample")
    if not scores.is_floating_point():
        raise ValueError(f"scores must be floating point, got {scores.dtype}")


def _check_tau(tau: float) -> None:
    if not (np.isfinite(tau) and tau != 0):
        raise ValueError(f"tau (the softmax temperature) must be a finite non-zero number, got {tau!r}")


def temperature(step: int, params: PresenceParams) -> float:
    """tau at `step`: tau_1 before switch_step (stage 1), tau_2 from it on (stage 2)."""
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    return params.tau_1 if step < params.switch_step else params.tau_2


def presence_weights(
    scores: Tensor, tau: float, normalize: str = "none", *, group: Any = None, check: bool = True
) -> Tensor:
    """This rank's weights N softmax(s / tau) over the global batch: detached, float32.

    `scores` are this rank's per-sample self-influence scores (1-D, >= 0). check: raise
    ValueError on a non-finite or negative score (one host sync); False keeps the step sync-free.
    """
    _check_tau(tau)
    _check_scores(scores)
    if normalize not in ("none", "mean"):
        raise ValueError(f"normalize must be 'none' or 'mean', got {normalize!r}")
    with torch.no_grad():
        local = scores.detach().to(torch.float64)
        full, start = gather_batch(local, group)
        if check:
            # After the gather, so every rank sees the same batch and raises together.
            bad = ~torch.isfinite(full) | (full < 0)
            if bool(bad.any()):
                i = int(torch.nonzero(bad)[0].item())
                raise ValueError(
                    f"self-influence score at global sample index {i} is {full[i].item()}; "
                    "scores are squared gradient norms and must be finite and >= 0"
                )
        if normalize == "mean":
            full = full / full.mean().clamp(min=torch.finfo(torch.float64).tiny)
        w = torch.softmax(full / tau, dim=0) * full.numel()
        return w[start : start + local.numel()].to(torch.float32)


def weights_for_step(
    step: int,
    scores: Tensor,
    params: PresenceParams | dict[str, Any],
    *,
    group: Any = None,
    check: bool = True,
) -> Tensor:
    """The weights of training step `step`, with the stage's temperature."""
    p = params if isinstance(params, PresenceParams) else PresenceParams.parse(params)
    return presence_weights(scores, temperature(step, p), p.normalize, group=group, check=check)


def output_layer_self_influence(
    hidden: Tensor, logits: Tensor, labels: Tensor, loss_mask: Tensor, *, bias: bool = False
) -> Tensor:
    """s_i = ||grad_W l_i||^2 (+ ||grad_b l_i||^2 with bias) for each sample, in closed form.

    hidden [b, s, H]: the output layer's input; logits [b, s, V]: its output; labels [b, s];
    loss_mask [b, s]. l_i is the token mean of the cross entropy over the sample's loss tokens.
    Returns [b] in the inputs' float dtype (float32 at least). No host sync.
    """
    if hidden.ndim != 3 or logits.ndim != 3 or hidden.shape[:2] != logits.shape[:2]:
        raise ValueError(
            f"hidden must be [b, s, H] and logits [b, s, V] over the same b, s; "
            f"got {tuple(hidden.shape)} and {tuple(logits.shape)}"
        )
    if labels.shape != hidden.shape[:2] or loss_mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"labels and loss_mask must be [b, s] = {tuple(hidden.shape[:2])}, "
            f"got {tuple(labels.shape)} and {tuple(loss_mask.shape)}"
        )
    dtype = torch.promote_types(torch.promote_types(hidden.dtype, logits.dtype), torch.float32)
    with torch.no_grad():
        h = hidden.detach().to(dtype)
        b, s, H = h.shape
        V = logits.shape[-1]
        m = loss_mask.detach().to(dtype)
        n = m.sum(dim=1).clamp(min=1)
        out = torch.empty(b, dtype=dtype, device=h.device)
        gram = s * (V + H) < V * H
        for i in range(b):  # one sample at a time bounds the temporaries to one sample's [s, V]
            d = torch.softmax(logits[i].detach().to(dtype), dim=-1)
            d[torch.arange(s, device=d.device), labels[i].long()] -= 1.0
            d *= m[i, :, None]
            if gram:
                sq = ((d @ d.t()) * (h[i] @ h[i].t())).sum()
            else:
                sq = (d.t() @ h[i]).square().sum()
            if bias:
                sq = sq + d.sum(dim=0).square().sum()
            out[i] = sq / (n[i] * n[i])
        return out


def output_layer_self_influence_np(
    hidden: np.ndarray, logits: np.ndarray, labels: np.ndarray, loss_mask: np.ndarray
) -> np.ndarray:
    """float64 reference of `output_layer_self_influence` (no bias) through the [V, H] gradients."""
    h = np.asarray(hidden, np.float64)
    z = np.asarray(logits, np.float64)
    m = np.asarray(loss_mask, np.float64)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    b, s, _ = h.shape
    p[np.arange(b)[:, None], np.arange(s)[None, :], np.asarray(labels)] -= 1.0
    d = p * m[..., None]
    g = np.einsum("bsv,bsh->bvh", d, h) / np.maximum(m.sum(axis=1), 1)[:, None, None]
    return (g * g).sum(axis=(1, 2))


def presence_weights_np(scores: np.ndarray, tau: float, normalize: str = "none") -> np.ndarray:
    """float64 reference of `presence_weights` for the whole (global) batch; sums to its size."""
    _check_tau(tau)
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or s.size == 0 or not np.isfinite(s).all() or (s < 0).any():
        raise ValueError(f"scores must be a non-empty 1-D array of finite numbers >= 0, got {s!r}")
    if normalize == "mean":
        s = s / max(s.mean(), np.finfo(np.float64).tiny)
    x = s / tau
    g = np.exp(x - x.max())
    return g / g.sum() * s.size
