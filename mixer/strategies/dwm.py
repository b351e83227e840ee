"""DWM, service side: train the data weighting model from reported per-sample alignments, stage by
stage, and ship it as a version (Yu, Han, Zhou, Tang, Huang, Wang, Tao, ICML 2025, "LLM Data
Selection and Utilization via Dynamic Bi-level Optimization", arXiv:2507.16178). The weighting
models, their inputs and the upper-level gradient are in `mixer.weighting.dwm`.

The paper's bi-level problem (the LLM theta trains on the weighted loss, the weighting model phi on
the validation loss of the model that weighting produced):

    min_phi  L_val(theta*(phi))     theta*(phi) = argmin_theta (1/N) sum_i w_i(phi) l_i(theta)

One-step unrolling, theta' = theta - eta (1/N) sum_i w_i grad l_i, and the chain rule give the
upper-level gradient from one scalar per sample, which workers measure and report as
`sample_align`:

    s_i           = <grad l_i(theta), grad L_val(theta')>
    dL_val/dphi   = -eta sum_i s_i dw_i/dphi          (1/N folded into eta)

Choices that are ours in measuring s_i (mixer.megatron.probes.SampleAlignProbe): both gradients are
restricted to the output layer's weight (a per-sample gradient of the whole model costs a backward
per sample), and theta' is the parameters after the job's own optimiser step (measured after
optimizer.step()), where the derivation has a plain gradient step of size eta; eta is then a scale,
which the service's Adam barely sees.

`mixer.weighting.dwm.service_update` takes one optimiser step on phi per reported batch (the
surrogate J(phi) = -eta sum_i s_i w_i(phi), s held constant) and then folds the batch's losses into
the running per-domain means the features use. Reports of one step form one batch (ranks report
slices of the global batch; the weights are a softmax over all of it).

Stages (the paper's "dynamic" part): training is cut into `stages` equal stages (5 in the paper) of
L = ceil(weighting.params.total_steps / stages) steps, or `stage_steps` when set. In the paper each
stage first updates the weighting model against the current LLM, then freezes it while the LLM trains
through the rest of the stage, and the next stage starts from it. Here the first `learn_steps` steps
of a stage (0: the whole stage) are its learning phase: the service trains phi on alignments measured
at those steps, ignores alignments from the frozen rest, and publishes the model (with the feature
means) once the phase has been reported through its last step; workers then apply that model,
unchanged, until the next publication. phi and its Adam state carry over from stage to stage. A
service cannot train before workers report, so until the first publication workers weight with the
spec's model: uniformly (the untrained model's output), or with a transferred one (`init_from`). A window that spans a publication point trains on all of its batches,
then publishes once.

Domain weights are not this method's business: every version keeps the prior. Version params:
`stage` (0-based stage whose learning phase produced the model), `phi_updates` (optimiser steps so
far), `samples` (samples trained on), `stage_steps` and `learn_steps` (so workers can switch their
alignment probes on only while the service learns: see `DWM.learning_at`); the model and the
feature state travel in the blob (`mixer.weighting.dwm.to_bytes`, safetensors, no optimiser state).

The model's hyperparameters (model, hidden, lr, eta, optimizer, momentum, num_topics, seq_len,
total_steps) are the job's `weighting.params` when `weighting.name` is `dwm`, else the defaults the
spec resolves against (DwmParams', or for a spec stored before parameters were written out, that
time's: model mlp-features); phi is initialised from the job seed, or (transfer) from `weighting.params.init_from`, a
model exported from another job (`mixer.transfer.export_weighting_model`), possibly trained with an
LLM of another size. With `frozen: true` the service never trains that model: no stage learns, no
version is published, and workers apply the spec's model throughout (the paper's transfer setting). torch is imported at the first update that trains, never at import,
so that a server without DWM jobs does not pay for it. Training runs on one torch thread, which
keeps it bit-identical between the server and a replay in another process.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from typing import Any, ClassVar

import numpy as np

from mixer.signals import SAMPLE_ALIGNMENT, SAMPLE_LOSS, Report, Window
from mixer.spec_defaults import LEGACY_DEFAULTS, LEGACY_DEFAULTS_VERSION
from mixer.strategies import register
from mixer.strategies.base import Decision, State, Strategy
from mixer.weighting import parse_weighting_params
from mixer.weighting.params import DwmParams

# service_update refuses features that overflow float32 (absurd reported losses): the window is
# skipped, counted in state["skipped"], and the model stays as it was.
_SKIP_ERRORS = (ValueError, FloatingPointError)


@register
class DWM(Strategy):
    name = "dwm"
    signals = frozenset({SAMPLE_ALIGNMENT, SAMPLE_LOSS})
    defaults: ClassVar[dict[str, Any]] = {"stages": 5, "stage_steps": 0, "learn_steps": 0}

    def __init__(self, spec):
        super().__init__(spec)
        w = spec.weighting
        # Without a DWM weighting the model's hyperparameters are the defaults the spec resolves against.
        given = (
            w.params
            if w.name == "dwm"
            else LEGACY_DEFAULTS["weighting"]["dwm"]
            if spec.defaults_version == LEGACY_DEFAULTS_VERSION
            else {}
        )
        self.config: DwmParams = parse_weighting_params("dwm", given)

    def validate(self) -> None:
        p = self.params
        for name, lo in (("stages", 1), ("stage_steps", 0), ("learn_steps", 0)):
            self.check(
                name,
                isinstance(p[name], int) and not isinstance(p[name], bool) and p[name] >= lo,
                f"must be an integer >= {lo}",
            )
        self.check(
            "learn_steps",
            p["learn_steps"] <= self.stage_length,
            f"must not exceed the stage length {self.stage_length} (0: learn through the whole stage)",
        )
        if self.config.init_from:
            from mixer.weighting.params import check_init_from

            check_init_from(self.config, self.K)

    @property
    def stage_length(self) -> int:
        """L: steps per stage."""
        return self.params["stage_steps"] or max(
            1, math.ceil(self.config.total_steps / self.params["stages"])
        )

    @property
    def learn_length(self) -> int:
        """Steps at the start of each stage whose alignments train the model."""
        return self.params["learn_steps"] or self.stage_length

    def learning_at(self, step: int) -> bool:
        """Whether alignments measured at `step` train the model (workers may skip the probe otherwise)."""
        return not self.config.frozen and step % self.stage_length < self.learn_length

    def _publish_step(self, step: int) -> int:
        """The last learning step of the stage that holds `step`."""
        return (step // self.stage_length) * self.stage_length + self.learn_length - 1

    def init(self, seed: int) -> State:
        K = self.K
        return {
            "seed": seed,
            "phi": {},  # created from the seed at the first training batch (needs torch)
            "domain_mean": np.zeros(K, dtype=np.float64),
            "domain_seen": np.zeros(K, dtype=bool),
            "stage": -1,
            "phi_updates": 0,
            "samples": 0,
            "skipped": 0,
            "pending": 0,
            "publish_at": -1,
        }

    def _batches(self, window: Window) -> list[tuple[int, list[Report]]]:
        """Reports with alignments at learning steps, grouped by step in log order of first appearance."""
        groups: dict[int, list[Report]] = {}
        for r in window.reports:
            if r.sample_align is None or r.sample_domain is None or r.sample_align.size == 0:
                continue
            if self.learning_at(r.step):
                groups.setdefault(r.step, []).append(r)
        return list(groups.items())

    def update(self, state: State, window: Window) -> tuple[State, Decision | None]:
        groups = self._batches(window)
        new = dict(state)
        if groups:
            self._train(new, groups)
        if new["pending"] == 0 or window.step < new["publish_at"]:
            return new, None
        from mixer.weighting import dwm

        stage = new["publish_at"] // self.stage_length
        new.update(stage=stage, pending=0, publish_at=-1)
        builder = self._builder(new)
        params = {
            "stage": int(stage),
            "phi_updates": int(new["phi_updates"]),
            "samples": int(new["samples"]),
            "stage_steps": self.stage_length,
            "learn_steps": self.learn_length,
        }
        blob = canonical_safetensors(dwm.to_bytes(new["phi"], builder))
        return new, Decision(weights=self.prior.copy(), params=params, blob=blob)

    def _builder(self, state: State):
        from mixer.weighting import dwm

        builder = dwm.FeatureBuilder.from_params(self.K, self.config)
        builder.load_state_dict({"domain_mean": state["domain_mean"], "domain_seen": state["domain_seen"]})
        return builder

    def _train(self, state: State, groups: list[tuple[int, list[Report]]]) -> None:
        """service_update on the window's batches; on success fold the result into `state`."""
        from mixer.weighting import dwm

        batches = []
        for step, reports in groups:
            topics = None
            if self.config.num_topics and any(r.sample_topic is not None for r in reports):
                # -1 marks a sample without a topic id; the features give it no topic share.
                topics = np.concatenate(
                    [
                        r.sample_topic
                        if r.sample_topic is not None
                        else np.full(r.sample_loss.size, -1, np.int32)
                        for r in reports
                    ]
                ).astype(np.int64)
            batches.append(
                dwm.SampleBatch(
                    step=step,
                    losses=np.concatenate([r.sample_loss for r in reports]),
                    domains=np.concatenate([r.sample_domain for r in reports]).astype(np.int64),
                    s=np.concatenate([r.sample_align for r in reports]),
                    topics=topics,
                )
            )
        builder = self._builder(state)
        phi = state["phi"] or dwm.initial_model(self.config, self.K, state["seed"])[0]
        try:
            with _one_torch_thread():
                phi = dwm.service_update(phi, builder, self.config, batches)
        except _SKIP_ERRORS:
            state["skipped"] += len(batches)
            return
        if not all(np.isfinite(phi[k]).all() for k in dwm.model_keys(phi)):
            # An alignment large enough to overflow the step would ship a model workers must refuse.
            state["skipped"] += len(batches)
            return
        if state["pending"] == 0:
            state["publish_at"] = self._publish_step(batches[0].step)
        state.update(
            phi=phi,
            domain_mean=builder.domain_mean,
            domain_seen=builder.domain_seen,
            phi_updates=state["phi_updates"] + len(batches),
            samples=state["samples"] + sum(int(b.s.size) for b in batches),
            pending=state["pending"] + len(batches),
        )


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors bytes with the header's keys sorted: safetensors writes `__metadata__`
    in hash-map order, which differs from process to process, and a replay compares blobs byte
    for byte. Tensor data and offsets are untouched; the header is space-padded to 8 bytes as
    safetensors pads it."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + size :]


@contextmanager
def _one_torch_thread():
    """One intra-op thread while training: reductions then sum in one fixed order in every process."""
    import torch

    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before != 1:
            torch.set_num_threads(before)
