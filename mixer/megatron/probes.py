"""Probes: the signals beyond per-domain losses that some strategies need (mixer.signals names them).

Each reduces on the device to a few numbers per domain or per sample and never syncs the host;
the results ride the step's asynchronous host copy. Costs, with F and B one forward and one
backward of a training micro-batch of b samples:

- ExcessLossProbe (DoReMi, EXCESS_LOSS): a forward of the frozen reference model on the step's
  batch, every step: about +F per step (~ +1/3 of a step). Plus one all-reduce of K floats. The
  same forward's per-token losses (`reference_token_loss`) give the `token-reference` (PRIOR)
  token weights their p_ref, at no further cost.
- AlignmentProbe (DGA, ALIGNMENT): every T steps, K forward+backward passes on per-domain probe
  batches, each the domain's share w_i b of the training batch (at least `samples`), plus one of b
  samples for a target data prefix; K flattened gradients kept in float32 (K x parameters x 4
  bytes) and all-reduced over data-parallel ranks: about (F + B) (1 + K samples / b) / T per step
  on average (twice that with a target prefix).
- SampleAlignProbe (DWM, SAMPLE_ALIGNMENT): every T steps, one forward of a balanced validation
  batch and, per training sample, two [s, h] x [h, V] products with the output layer: output-layer
  only, so about (F_val + 2 x output-layer forward) / T per step.
- SelfInfluenceProbe (PRESENCE weighting): every step, each sample's squared output-layer gradient
  norm in closed form from the forward's hidden states and logits (mixer.weighting.presence): one
  softmax over the logits and one [V, s] x [s, H] product per sample, about one output-layer
  forward plus a softmax per step; no backward, no host sync.
- validation_loss (VAL_LOSS): every N steps, a forward over `samples` per domain, split over
  data-parallel ranks; one host sync at the end. Periodic, on the critical path when it runs.

Per-domain probe batches are drawn from each domain's own dataset at a position that depends only
on the probe round, so they are balanced across domains (a zero-weight domain is still measured)
and a resumed run measures the same samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mixer.megatron.loss import gather_samples
from mixer.megatron.model import unwrap
from mixer.megatron.sampler import MixtureDataset

__all__ = ["AlignmentProbe", "ExcessLossProbe", "SampleAlignProbe", "SelfInfluenceProbe", "validation_loss"]


def _world(group: Any = None) -> tuple[int, int]:
    dist = torch.distributed
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _all_reduce(t: Tensor, group: Any = None) -> Tensor:
    if _world(group)[1] > 1:
        torch.distributed.all_reduce(t, group=group)
    return t


def _to(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _round_batch(ds: Any, domain: int, n: int, round_: int, group: Any = None) -> list[tuple[int, int]]:
    """This rank's n keys of probe round `round_` in one domain's dataset (disjoint across ranks)."""
    rank, world = _world(group)
    base = (round_ * world + rank) * n
    return [(domain, (base + j) % len(ds)) for j in range(n)]


class ExcessLossProbe:
    """DoReMi's clipped excess loss: per domain, sum over tokens of max(loss - reference loss, 0)."""

    def __init__(self, reference: torch.nn.Module, num_domains: int, group: Any = None) -> None:
        self.reference = reference.eval().requires_grad_(False)
        self.num_domains = num_domains
        self.group = group

    @torch.no_grad()
    def reference_token_loss(self, batch: dict[str, Tensor]) -> Tensor:
        """[b, s] the frozen reference model's per-token loss, -log p_ref(x_t | x_<t), detached.

        The `token-reference` weighting (PRIOR) reads p_ref = exp(-this); pass the same tensor to
        `measure(..., ref_loss=...)` so that one reference forward serves both."""
        return self.reference(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).detach()

    @torch.no_grad()
    def measure(self, batch: dict[str, Tensor], per_token: Tensor, ref_loss: Tensor | None = None) -> Tensor:
        """[K] float64 over the global batch (all-reduced), on the device; `ref_loss`: this
        batch's `reference_token_loss` when already computed (no second forward)."""
        ref = self.reference_token_loss(batch) if ref_loss is None else ref_loss
        mask = batch["loss_mask"].float()
        excess = ((per_token.detach().float() - ref.float()).clamp(min=0) * mask).sum(dim=1)
        out = torch.zeros(self.num_domains, device=excess.device, dtype=torch.float64)
        out.index_add_(0, batch["dataset_id"].long(), excess.double())
        return _all_reduce(out, self.group)


class AlignmentProbe:
    """DGA/DoGE: W_i = <grad l_i, target gradient> per domain, and the mean domain-gradient norm."""

    def __init__(
        self,
        model: torch.nn.Module,
        datasets: Sequence[Any],
        *,
        every: int,
        samples: int,
        batch: int = 0,
        max_grad_norm: float = 0.0,
        target: Sequence[int] = (),
        target_dataset: Any = None,
        exclude_self: bool = True,
        device: torch.device | str = "cpu",
        group: Any = None,
    ) -> None:
        """samples: the least per domain and rank; batch: this rank's training batch (0: every
        domain gets `samples`); max_grad_norm: each gradient is clipped to this norm before the
        products, as DoGE clips each domain's gradient (0: no clipping)."""
        if every <= 0 or samples <= 0 or batch < 0 or not max_grad_norm >= 0:
            raise ValueError(
                f"alignment probe needs every > 0, samples > 0, batch >= 0 and max_grad_norm >= 0, "
                f"got {every}, {samples}, {batch} and {max_grad_norm}"
            )
        self.model = model
        self.data = MixtureDataset(list(datasets) + ([target_dataset] if target_dataset is not None else []))
        self.num_domains = len(datasets)
        self.every, self.samples, self.batch = every, samples, batch
        self.max_grad_norm = float(max_grad_norm)
        # The target is the sum of the target domains' gradients (DoGE eq. 3), all domains when
        # none are named; a target data prefix replaces it with that data's own gradient.
        self.target = list(target) or list(range(self.num_domains))
        self.has_target_dataset = target_dataset is not None
        self.exclude_self = exclude_self and not self.has_target_dataset
        self.device = torch.device(device)
        self.group = group

    def due(self, step: int) -> bool:
        # The last step of each window of T: the report lands with the engine's update step.
        return step % self.every == self.every - 1

    def _gradient(self, keys: list[tuple[int, int]]) -> Tensor:
        """Flattened float32 gradient of the token-mean loss of these samples, averaged over ranks."""
        batch = _to(self.data.batch(keys), self.device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        per_token = self.model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        mask = batch["loss_mask"].to(per_token.dtype)
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        flat = torch.cat(
            [(g if g is not None else torch.zeros_like(p)).reshape(-1).float() for g, p in zip(grads, params)]
        )
        world = _world(self.group)[1]
        flat = _all_reduce(flat, self.group).div_(world) if world > 1 else flat
        if self.max_grad_norm > 0:
            # DoGE: g <- g min(1, max_norm / (||g|| + 1e-6)), on the data-parallel average.
            flat = flat * (self.max_grad_norm / (flat.double().norm() + 1e-6)).clamp(max=1.0).float()
        return flat

    def sizes(self, weights: Sequence[float] | None) -> list[int]:
        """Per-domain probe samples on this rank: round(w_i x batch), at least `samples`."""
        if weights is None or self.batch == 0:
            return [self.samples] * self.num_domains
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (self.num_domains,) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError(
                f"alignment probe: weights must be {self.num_domains} finite numbers >= 0, got {weights!r}"
            )
        return [max(self.samples, round(float(x) * self.batch)) for x in w / w.sum()]

    def measure(
        self, step: int, weights: Sequence[float] | None = None, lr: float | None = None
    ) -> dict[str, Tensor]:
        """{"alignment": [K] float64, "grad_norm_mean": [] float64, and "lr": [] float64 when given},
        on the device. weights: the mixture in force, which sizes each domain's probe batch."""
        round_ = step // self.every
        sizes = self.sizes(weights)
        rows = [
            self._gradient(_round_batch(self.data.datasets[d], d, sizes[d], round_, self.group))
            for d in range(self.num_domains)
        ]
        G = torch.stack(rows).double()
        if self.has_target_dataset:
            k = self.num_domains
            n = self.batch or self.samples
            target = self._gradient(_round_batch(self.data.datasets[k], k, n, round_, self.group)).double()
        else:
            target = G[self.target].sum(dim=0)
        W = G @ target
        if self.exclude_self:
            # DoGE drops <g_i, g_i> from W_i when domain i is itself part of the target.
            in_target = torch.zeros(self.num_domains, dtype=torch.float64, device=G.device)
            in_target[self.target] = 1.0
            W = W - in_target * (G * G).sum(dim=1)
        out = {"alignment": W, "grad_norm_mean": G.norm(dim=1).mean()}
        if lr is not None:
            out["lr"] = torch.tensor(float(lr), dtype=torch.float64, device=W.device)
        return out


class SampleAlignProbe:
    """DWM: s_i = <grad l_i, grad L_val> restricted to the output layer's weight, per training sample."""

    # With h_t the output layer's input at token t, W its weight, p_t = softmax(W h_t) and y_t the
    # label: grad_W l_i = (1/T_i) sum_t (p_t - e_{y_t}) h_t^T. With G = grad_W L_val (balanced: the
    # mean over domains of each domain's token-mean validation loss), s_i = (1/T_i) sum_t
    # <p_t - e_{y_t}, G h_t>. The hidden states come from a forward hook on the output layer; the
    # logits are recomputed from them (megatron's cross entropy may modify its input in place).
    # DWM's one-step unroll takes G at the parameters after the step (theta') and grad l_i at those
    # the batch saw (theta): `capture` keeps a copy of W as the batch saw it, and `measure` may run
    # after optimizer.step() (one extra copy of the output layer's weight per probe step).

    def __init__(
        self,
        model: torch.nn.Module,
        val_datasets: Sequence[Any],
        *,
        every: int,
        samples: int,
        device: torch.device | str = "cpu",
        group: Any = None,
    ) -> None:
        if every <= 0 or samples <= 0:
            raise ValueError(
                f"sample-alignment probe needs every > 0 and samples > 0, got {every} and {samples}"
            )
        self.model = model
        self.data = MixtureDataset(val_datasets)
        self.every, self.samples = every, samples
        self.device = torch.device(device)
        self.group = group
        self.output_layer = unwrap(model).output_layer
        self._armed = False
        self._hidden: Tensor | None = None
        self._weight: Tensor | None = None  # W as the captured batch saw it
        self._handle = self.output_layer.register_forward_hook(self._hook)

    def close(self) -> None:
        self._handle.remove()

    def due(self, step: int) -> bool:
        return step % self.every == self.every - 1

    def _hook(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self._armed:
            self._hidden = args[0].detach()

    @contextmanager
    def capture(self, active: bool, *, keep_weight: bool = True):
        """Record the output layer's input during the forward inside this block (when active)."""
        if active and keep_weight:
            self._weight = self.output_layer.weight.detach().clone()
        self._armed = active
        try:
            yield
        finally:
            self._armed = False

    def _deltas(self, h: Tensor, labels: Tensor, weight: Tensor | None = None) -> Tensor:
        """p - onehot(labels) for hidden states h [n, H] (float32), with W now or `weight`."""
        W = (self.output_layer.weight if weight is None else weight).detach().float()
        delta = torch.softmax(h @ W.t(), dim=-1)
        delta[torch.arange(h.shape[0], device=h.device), labels] -= 1.0
        return delta

    @torch.no_grad()
    def _val_gradient(self) -> Tensor:
        """grad_W of the balanced validation loss [V, H] (float32), all-reduced over ranks."""
        was_training = self.model.training
        self.model.eval()
        K = len(self.data.datasets)
        G = None
        try:
            for d in range(K):
                rank, world = _world(self.group)
                n = min(self.samples, len(self.data.datasets[d]))
                keys = [(d, i) for i in range(rank, n, world)]
                Gd = torch.zeros_like(self.output_layer.weight, dtype=torch.float32)
                tokens = torch.zeros((), device=Gd.device, dtype=torch.float32)
                if keys:
                    batch = _to(self.data.batch(keys), self.device)
                    with self.capture(True, keep_weight=False):
                        self.model(batch["tokens"], batch["position_ids"], None)
                    h = self._hidden.transpose(0, 1).reshape(-1, self._hidden.shape[-1]).float()
                    self._hidden = None
                    mask = batch["loss_mask"].reshape(-1).float()
                    delta = self._deltas(h, batch["labels"].reshape(-1)) * mask[:, None]
                    Gd += delta.t() @ h
                    tokens += mask.sum()
                _all_reduce(Gd, self.group)
                _all_reduce(tokens, self.group)
                Gd /= tokens.clamp(min=1)
                G = Gd if G is None else G + Gd
        finally:
            self.model.train(was_training)
        return G / K

    @torch.no_grad()
    def measure(self, batch: dict[str, Tensor]) -> Tensor:
        """[global batch] float32 (gathered in rank order), from the hidden states captured this step;
        called after optimizer.step(), G is the validation gradient at the updated parameters."""
        if self._hidden is None:
            raise RuntimeError("SampleAlignProbe.measure needs a forward inside capture(True) first")
        hidden, self._hidden = self._hidden, None
        weight, self._weight = self._weight, None
        G = self._val_gradient()
        mask = batch["loss_mask"].float()
        out = torch.empty(hidden.shape[1], device=hidden.device, dtype=torch.float32)
        for i in range(hidden.shape[1]):  # one sample at a time bounds the [s, V] temporaries
            h = hidden[:, i].float()
            u = h @ G.t()
            delta = self._deltas(h, batch["labels"][i], weight)
            out[i] = ((delta * u).sum(dim=-1) * mask[i]).sum() / mask[i].sum().clamp(min=1)
        return gather_samples(out, self.group)


class SelfInfluenceProbe:
    """PRESENCE: s_i = ||grad_W l_i||^2 of the output layer for each sample of the step's batch.

    A forward hook on the output layer computes the scores while the logits are still intact
    (megatron's cross entropy may modify them in place afterwards); `capture(batch)` arms it for
    one forward, `scores()` hands the result over. Tensor parallel size 1 (the full vocabulary).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.output_layer = unwrap(model).output_layer
        self._batch: dict[str, Tensor] | None = None
        self._scores: Tensor | None = None
        self._handle = self.output_layer.register_forward_hook(self._hook)

    def close(self) -> None:
        self._handle.remove()

    def _hook(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self._batch is None:
            return
        from mixer.weighting.presence import output_layer_self_influence

        logits = output[0] if isinstance(output, tuple) else output
        batch, self._batch = self._batch, None  # one forward per capture
        # Megatron's layout is [s, b, .]; the batch's is [b, s].
        self._scores = output_layer_self_influence(
            args[0].transpose(0, 1),
            logits.transpose(0, 1),
            batch["labels"],
            batch["loss_mask"],
            bias=getattr(module, "bias", None) is not None,
        )

    @contextmanager
    def capture(self, batch: dict[str, Tensor]):
        """Score the samples of `batch` during the forward inside this block."""
        self._batch, self._scores = batch, None
        try:
            yield
        finally:
            self._batch = None

    def scores(self) -> Tensor:
        """[local batch] scores (float32 at least, on the device) of the last captured forward."""
        if self._scores is None:
            raise RuntimeError("SelfInfluenceProbe.scores needs a forward inside capture(batch) first")
        out, self._scores = self._scores, None
        return out


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module,
    val_datasets: Sequence[Any],
    samples: int,
    batch_size: int,
    device: torch.device | str,
    group: Any = None,
) -> np.ndarray:
    """Balanced validation: each domain's first `samples` samples scored on their own, split over ranks."""
    device = torch.device(device)
    rank, world = _world(group)
    data = MixtureDataset(val_datasets)
    was_training = model.training
    model.eval()
    K = len(val_datasets)
    sums = torch.zeros(2 * K, device=device, dtype=torch.float64)  # loss sums, then token counts
    try:
        for d, ds in enumerate(val_datasets):
            indices = list(range(rank, min(samples, len(ds)), world))
            for start in range(0, len(indices), batch_size):
                batch = _to(data.batch([(d, i) for i in indices[start : start + batch_size]]), device)
                per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
                mask = batch["loss_mask"].to(per_token.dtype)
                sums[d] += (per_token.float() * mask).sum().double()
                sums[K + d] += mask.sum().double()
    finally:
        model.train(was_training)
    host = _all_reduce(sums, group).cpu().numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(host[K:] > 0, host[:K] / host[K:], np.nan)
