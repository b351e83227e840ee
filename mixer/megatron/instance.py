"""Instance weighting inside the training step, with parameters from the applied weight version.

The job spec names the method (`weighting.name`: loss, topic, dwm, presence, token-loss or
token-reference; mixer.weighting
holds the pure functions) and its initial parameters. A version may override them; the worker
looks, in this order of precedence, at:

- loss, topic, presence, token-loss, token-reference: first the version's top-level params that
  the job's strategy declares it ships for the weighting (`ships_weighting_params`: ToReMi's
  `topic_weights`), then `version.params["weighting"]` (the spec's parameters as the service
  serves them, every default written out), then other top-level params that are parameter names of
  the method, then the spec's `weighting.params`;
- dwm: `version.blob` (mixer.weighting.dwm.to_bytes: the model and the feature state); before
  the first blob, the spec's model (`weighting.params.init_from`, a transferred model) or a fresh
  one, which gives exactly uniform weights.

When the job's strategy ships per-domain loss weights (DoReMi's paper mode), every version's
`params["domain_loss_weights"]` multiplies each sample's weight by its domain's (with method
`none`, they are the whole weighting); weight 1 until the first version that carries them.

New parameters take effect together with the version's domain weights: `sync(version)` is called
once the sampler has applied a version, so a step's weights and its instance weighting always
come from the same version, on every rank. Topic ids are each sample's topics from `mixer topics
build` (a row per sample, -1 padded; mixer.megatron.data.TopicLabels), or the domain ids when the
loop has none. DWM features treat every sample as a full sequence (lengths None):
reports carry no per-sample lengths, so that is what the service can rebuild too. PRESENCE
weights come from each sample's self-influence score (probes.SelfInfluenceProbe), which the
training loop measures during the forward and passes to `weights(..., scores=...)`.
Token-level methods (TLDR, PRIOR; mixer.weighting.token) give per-token weights through
`token_weights(step, per_token_loss, loss_mask, reference_token_loss)`, which the loop passes to
compute_loss(token_weights=...); their per-sample weights are 1.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mixer.megatron.loss import parse_domain_loss_weights, sample_loss_weights
from mixer.megatron.versions import VersionUpdate
from mixer.spec import JobSpec
from mixer.weighting import METHODS, parse_weighting_params

__all__ = ["InstanceWeighting"]

METHOD_NAMES = ("loss", "topic", "dwm", "presence", "token-loss", "token-reference")
TOKEN_METHODS = ("token-loss", "token-reference")


class InstanceWeighting:
    """Per-sample weights for the training loss of one job; off when the spec says `none`."""

    def __init__(self, spec: JobSpec, device: torch.device | str = "cpu", group: Any = None) -> None:
        self.method = spec.weighting.name
        self.num_domains = spec.num_domains
        self.spec_params = dict(spec.weighting.params)
        self.seed = spec.seed
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            # dwm.evaluate reuses the model tensors only when their device equals the batch's exactly.
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.group = group
        self.version = -1
        self._pending: dict[int, tuple[dict[str, Any], bytes]] = {}
        self._raw: tuple[dict[str, Any], bytes] = ({}, b"")
        # A strategy whose versions carry per-domain loss weights (DoReMi's paper mode) needs them
        # in the loss, with or without an instance weighting method; 1 until the first such version.
        from mixer.strategies import build_strategy

        strategy = build_strategy(spec)
        self.loss_weighted = bool(getattr(strategy, "ships_loss_weights", False))
        self.shipped = frozenset(getattr(strategy, "ships_weighting_params", frozenset()))
        self.domain_loss_weights: Tensor | None = None
        if self.enabled:
            self._configure({}, b"")

    @property
    def enabled(self) -> bool:
        return self.method in METHOD_NAMES or self.loss_weighted

    @property
    def token_level(self) -> bool:
        """True when the method weights tokens (`token_weights`) rather than samples."""
        return self.method in TOKEN_METHODS

    @property
    def needs_reference(self) -> bool:
        """True when `token_weights` needs the reference model's per-token loss (PRIOR)."""
        return self.method == "token-reference"

    def token_weights(
        self, step: int, per_token_loss: Tensor, loss_mask: Tensor, reference_token_loss: Tensor | None = None
    ) -> Tensor | None:
        """[b, s] detached token weights for compute_loss(token_weights=...), None unless the
        method is token-level; reference_token_loss: probes.ExcessLossProbe.reference_token_loss
        of the same micro-batch (token-reference)."""
        if not self.token_level:
            return None
        from mixer.weighting.token import token_weights

        return token_weights(
            self.method, self.params, step, per_token_loss, loss_mask, reference_token_loss, group=self.group
        )

    @property
    def needs_self_influence(self) -> bool:
        """True when `weights` needs the samples' self-influence scores (PRESENCE)."""
        return self.method == "presence"

    def offer(self, update: VersionUpdate) -> None:
        """Remember a received version's parameters until the sampler applies that version."""
        if self.enabled:
            self._pending[update.version] = (dict(update.params), bytes(update.blob))

    def sync(self, version: int) -> None:
        """Switch to the parameters of `version`, the one the sampler applied for this step."""
        if version == self.version:
            return
        if version in self._pending:
            params, blob = self._pending[version]
            self._configure(params, blob)
        # Versions the sampler skipped (a newer one was due first) are never applied.
        self._pending = {v: p for v, p in self._pending.items() if v > version}
        self.version = version

    def _configure(self, params: dict[str, Any], blob: bytes) -> None:
        """Parse the parameters in force (precedence in the module docstring)."""
        self._raw = (params, blob)
        if self.loss_weighted:
            c = parse_domain_loss_weights(params, self.num_domains)
            self.domain_loss_weights = (
                None if c is None else torch.tensor(c, dtype=torch.float32, device=self.device)
            )
        if self.method not in METHOD_NAMES:
            return
        if self.method == "dwm":
            from mixer.weighting import dwm

            p = parse_weighting_params(
                "dwm", {**self.spec_params, **_method_params(params, "dwm", self.shipped)}
            )
            self.params = p
            if blob:
                mlp, builder = dwm.from_bytes(blob)
                self.builder = builder or dwm.FeatureBuilder.from_params(self.num_domains, p)
            else:
                # The spec's model: transferred (init_from) or fresh from the seed (uniform weights).
                mlp, self.builder = dwm.initial_model(p, self.num_domains, self.seed)
            self.mlp = dwm.to_torch(mlp, self.device)
        else:
            self.params = parse_weighting_params(
                self.method, {**self.spec_params, **_method_params(params, self.method, self.shipped)}
            )

    def weights(
        self,
        step: int,
        sample_loss: Tensor,
        domain: Tensor,
        topics: Tensor | None = None,
        *,
        scores: Tensor | None = None,
    ) -> Tensor | None:
        """This rank's detached weights for the batch (None when weighting is off): the method's
        instance weights times the version's per-domain loss weights (mixer.megatron.loss); topics:
        the samples' topic ids (topic method; the domains when None); scores: the samples'
        self-influence (presence method)."""
        if not self.enabled:
            return None
        w = (
            self._method_weights(step, sample_loss, domain, topics, scores)
            if self.method in METHOD_NAMES
            else None
        )
        if self.domain_loss_weights is not None:
            return sample_loss_weights(domain, self.domain_loss_weights, w)
        return w if w is not None else torch.ones(sample_loss.shape[0], device=sample_loss.device)

    def _method_weights(
        self,
        step: int,
        sample_loss: Tensor,
        domain: Tensor,
        topics: Tensor | None,
        scores: Tensor | None = None,
    ) -> Tensor:
        """The instance weighting method's weights."""
        if self.method in TOKEN_METHODS:
            # Token-level methods weight inside the sample (token_weights); samples keep weight 1.
            return torch.ones(sample_loss.shape[0], device=sample_loss.device)
        if self.method == "presence":
            from mixer.weighting.presence import weights_for_step as presence_weights

            if scores is None or scores.shape != sample_loss.shape:
                got = None if scores is None else tuple(scores.shape)
                raise ValueError(
                    f"presence weighting needs one self-influence score per sample "
                    f"({tuple(sample_loss.shape)}), got {got}; measure them with probes.SelfInfluenceProbe"
                )
            # No host sync in the step: a non-finite score shows up as a non-finite step loss.
            return presence_weights(step, scores, self.params, group=self.group, check=False)
        if self.method == "loss":
            from mixer.weighting.loss_based import weights_for_step

            return weights_for_step(step, sample_loss, self.params, group=self.group)
        if self.method == "topic":
            from mixer.weighting.topic import weights_from_params

            return weights_from_params(domain if topics is None else topics, self.params, group=self.group)
        from mixer.weighting import dwm

        # Topic features only with the samples' topic rows (the service builds them from sample_topic).
        return dwm.weights_for_step(
            step, sample_loss, domain, self.mlp, self.builder, topics=topics, lengths=None, group=self.group
        )

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to continue with the same parameters (loadable with weights_only)."""

        def pack(params: dict[str, Any], blob: bytes) -> dict[str, Any]:
            return {
                "params": json.dumps(params, sort_keys=True),
                "blob": torch.from_numpy(np.frombuffer(blob, np.uint8).copy()),
            }

        return {
            "version": self.version,
            "current": pack(*self._raw),
            "pending": {str(v): pack(*p) for v, p in self._pending.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def unpack(d: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
            return json.loads(d["params"]), d["blob"].numpy().tobytes()

        self.version = int(state["version"])
        self._pending = {int(v): unpack(p) for v, p in state["pending"].items()}
        if self.enabled:
            self._configure(*unpack(state["current"]))


def _method_params(
    params: dict[str, Any], method: str, shipped: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """The method's parameters a version carries, in the module docstring's order of precedence."""
    names = METHODS[method]
    out = {k: v for k, v in params.items() if k in names}
    nested = params.get("weighting")
    if isinstance(nested, dict):
        out.update({k: v for k, v in nested.items() if k in names})
    out.update({k: params[k] for k in shipped if k in names and k in params})
    return out
