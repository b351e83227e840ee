"""Instance weighting inside the training step, with parameters from the applied weight version.

The job spec names the method (`weighting.name`: loss, topic or dwm; mixer.weighting holds the
pure functions) and its initial parameters. A version may override them; the worker looks, in
this order of precedence, at:

- loss, topic: `version.params["weighting"]` (a mapping of the method's parameters), then the
  version's top-level params that are parameter names of the method (ToReMi ships
  `topic_weights` there), then the spec's `weighting.params`;
- dwm: `version.blob` (mixer.weighting.dwm.to_bytes: the MLP and the feature state); before
  the first blob, a fresh model from the spec, which gives exactly uniform weights.

New parameters take effect together with the version's domain weights: `sync(version)` is called
once the sampler has applied a version, so a step's weights and its instance weighting always
come from the same version, on every rank. Topic ids are the domain ids (our byte-level datasets
carry no finer topic labels). DWM features treat every sample as a full sequence (lengths None):
reports carry no per-sample lengths, so that is what the service can rebuild too.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mixer.megatron.versions import VersionUpdate
from mixer.spec import JobSpec
from mixer.weighting import METHODS, parse_weighting_params

__all__ = ["InstanceWeighting"]

METHOD_NAMES = ("loss", "topic", "dwm")


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
        if self.enabled:
            self._configure({}, b"")

    @property
    def enabled(self) -> bool:
        return self.method in METHOD_NAMES

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
        if self.method == "dwm":
            from mixer.weighting import dwm

            p = parse_weighting_params("dwm", {**self.spec_params, **_method_params(params, "dwm")})
            self.params = p
            if blob:
                mlp, builder = dwm.from_bytes(blob)
                self.builder = builder or dwm.FeatureBuilder.from_params(self.num_domains, p)
            else:
                self.builder = dwm.FeatureBuilder.from_params(self.num_domains, p)
                mlp = dwm.init_params(self.builder.num_features, p.hidden, seed=self.seed)
            self.mlp = dwm.to_torch(mlp, self.device)
        else:
            self.params = parse_weighting_params(
                self.method, {**self.spec_params, **_method_params(params, self.method)}
            )

    def weights(self, step: int, sample_loss: Tensor, domain: Tensor) -> Tensor | None:
        """This rank's detached weights for the batch (None when weighting is off)."""
        if not self.enabled:
            return None
        if self.method == "loss":
            from mixer.weighting.loss_based import weights_for_step

            return weights_for_step(step, sample_loss, self.params, group=self.group)
        if self.method == "topic":
            from mixer.weighting.topic import weights_from_params

            return weights_from_params(domain, self.params, group=self.group)
        from mixer.weighting import dwm

        return dwm.weights_for_step(
            step, sample_loss, domain, self.mlp, self.builder, lengths=None, group=self.group
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


def _method_params(params: dict[str, Any], method: str) -> dict[str, Any]:
    """The method's parameters a version carries: top-level names of the method, then params["weighting"]."""
    names = METHODS[method]
    out = {k: v for k, v in params.items() if k in names}
    nested = params.get("weighting")
    if isinstance(nested, dict):
        out.update({k: v for k, v in nested.items() if k in names})
    return out
