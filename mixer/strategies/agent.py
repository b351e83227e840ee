"""A learned data-mixing policy: the Data Mixing Agent (Yang, Liu, Ji, Li, Gong, Cheng, Yang, 2025,
"Data Mixing Agent: Learning to Re-weight Domains for Continual Pre-training", arXiv:2507.15640).

The paper casts domain re-weighting as a Markov decision process: training is cut into
re-weighting steps t = 1..T of a fixed budget; after each, an evaluation environment gives
feedback; the agent observes the state s_t (the domain distributions it chose so far and the
feedback they earned) and chooses the action a_t, the domain distribution of the next step (a point
on the simplex). The agent is trained offline, by conservative Q-learning, on trajectories recorded
from a small proxy model (mixer.agent.collect, mixer.agent.train). This strategy deploys a trained
agent's policy network: at every evaluation it proposes the next weights.

How it maps onto a job (the choices that are ours, not the paper's, are marked "ours"):

- feedback: per-domain validation losses (VAL_LOSS reports), where the paper uses benchmark
  scores (MMLU, MATH) of the proxy; ours, so that any mixer job can supply it;
- re-weighting step: one per validation report (when one update window holds several, the newest
  is the step and the older ones are counted as `superseded`: one version per window is applied).
  The weights of the segment before the first evaluation are the spec's prior (ours: the paper's
  agent has no feedback to act on yet either);
- state (ours in its exact layout, the paper's in content: recent distributions and feedback):
  the last H distributions the strategy chose (H x K), the last H evaluations as per-domain loss
  divided by the mean loss of the job's first evaluation, minus 1 (H x K; scale-free, so a proxy's
  losses and a large model's are comparable), and progress t / horizon clipped to 1. Before H
  evaluations exist the earliest one is repeated;
- action: the mean of the policy's Dirichlet, softmax(z(s)): deterministic, so a replay re-derives
  every version (the paper samples the policy only while collecting data; ours);
- the network: an MLP of two tanh layers (ours: the paper's agent is a small model; its exact
  architecture is not reproduced here). The forward pass runs in numpy float64: the same bits
  in the server and in replay.

The agent in a spec (ours): `strategy.params.sha256` names it by content, the sha256 of its
safetensors file (the actor alone, float32, as `mixer agent train` writes actor.safetensors), and
`strategy.params.path` says where that file was. Whoever loads a spec from a file (mixer.transfer.
resolve_spec_text: `mixer job create`, the pretraining script, the Megatron plug-in) reads the file,
checks its hash and puts its bytes, base64, in `strategy.params.model`; the strategy, which does no
I/O, checks the hash of those bytes again and refuses a mismatch. So the stored spec carries the
agent itself and its name: a replay on another machine needs neither the file nor its path. A spec
may also carry `model` without `sha256` (one built in memory, as the benchmarks and tests do).

Domains: the network has one input and one output slot per domain of the space it was trained on.
A job over the same domain names (any order) is matched by name; a job over other names with the
same count is accepted with `match: position` (the paper's transfer to unseen source fields over
the same domain space: slot i keeps its meaning); any other domain count is refused, naming both.
A validation report with a loss outside [1e-6, 1e6] (or NaN: a domain not evaluated) is skipped and
counted (`skipped`); the loss inputs are clipped to [-1, 1000] (ours), so no accepted value makes the
state non-finite.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from typing import Any, ClassVar

import numpy as np

from mixer.errors import SpecError
from mixer.shaping import shape_weights
from mixer.signals import VAL_LOSS, Window
from mixer.strategies import register
from mixer.strategies.base import Decision, State, Strategy

FORMAT = "mixer.agent/1"
ACTOR_KEYS = ("actor.W1", "actor.b1", "actor.W2", "actor.b2", "actor.W3", "actor.b3")
MAX_HISTORY = 64
MAX_HORIZON = 1_000_000
MATCH_MODES = ("name", "position")
MAX_MODEL_CHARS = 768 << 10
"""`strategy.params.model` is at most this much base64 (576 KiB of safetensors): a spec is at most 1 MiB."""
MAX_PATH_CHARS = 4096
SHA256_RE = re.compile(r"[0-9a-f]{64}")
MIN_LOSS, MAX_LOSS = 1e-6, 1e6
"""Validation losses the agent acts on (nats); a report outside is skipped and counted."""
MAX_RATIO = 1e3
"""The loss inputs (loss / first mean - 1) are clipped to [-1, MAX_RATIO]."""


def num_features(K: int, history: int) -> int:
    """Length of the state vector for K domains and H = history."""
    return 2 * history * K + 1


def state_features(
    weights: np.ndarray, losses: np.ndarray, first_mean: float, t: int, horizon: int
) -> np.ndarray:
    """The state vector: weights (H x K, the distributions chosen for the last H steps), losses
    (H x K, the last H evaluations, raw), first_mean (mean loss of the first evaluation), t (number
    of evaluations so far), horizon (re-weighting steps of a whole run)."""
    w = np.asarray(weights, dtype=np.float64)
    ratio = np.clip(np.asarray(losses, dtype=np.float64) / first_mean - 1.0, -1.0, MAX_RATIO)
    return np.concatenate([w.ravel(), ratio.ravel(), [min(t / horizon, 1.0)]])


def actor_forward(params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """softmax(z(x)) for a state vector (F) or a batch (N x F), in float64."""
    p = {k: np.asarray(params[k], dtype=np.float64) for k in ACTOR_KEYS}
    h = np.tanh(x @ p["actor.W1"] + p["actor.b1"])
    h = np.tanh(h @ p["actor.W2"] + p["actor.b2"])
    z = h @ p["actor.W3"] + p["actor.b3"]
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def decode_model(text: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(actor parameters, metadata) from `strategy.params.model`; SpecError on anything else."""
    import safetensors.numpy

    where = "strategy.params.model"
    if not isinstance(text, str) or not text:
        raise SpecError(
            where,
            "required: a trained agent, named by strategy.params.path and sha256 (`mixer agent spec` "
            "writes them from the folder `mixer agent train` wrote), or as base64 safetensors",
        )
    if len(text) > MAX_MODEL_CHARS:
        raise SpecError(where, f"is {len(text)} characters of base64; at most {MAX_MODEL_CHARS}")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SpecError(where, "is not valid base64") from None
    try:
        size = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + size]).get("__metadata__", {}) if 8 <= len(data) else {}
        tensors = safetensors.numpy.load(data)
    except Exception as e:  # noqa: BLE001 - any parse failure is the same bad input
        raise SpecError(where, f"is not a safetensors agent ({type(e).__name__}: {e})") from None
    if meta.get("format") != FORMAT:
        raise SpecError(where, f"format is {meta.get('format')!r}, expected {FORMAT!r}")
    missing = [k for k in ACTOR_KEYS if k not in tensors]
    if missing:
        raise SpecError(where, f"has no tensor {missing[0]!r}")
    try:
        domains = json.loads(meta["domains"])
        history, horizon = int(meta["history"]), int(meta["horizon"])
    except (KeyError, ValueError, TypeError):
        raise SpecError(where, "metadata must carry domains (JSON list), history and horizon") from None
    if not (isinstance(domains, list) and domains and all(isinstance(d, str) for d in domains)):
        raise SpecError(where, "metadata.domains must be a non-empty list of names")
    if not 1 <= history <= MAX_HISTORY or not 1 <= horizon <= MAX_HORIZON:
        raise SpecError(
            where, f"metadata history must lie in [1, {MAX_HISTORY}] and horizon in [1, {MAX_HORIZON}]"
        )
    K, F = len(domains), num_features(len(domains), history)
    shapes = {"actor.W1": 2, "actor.b1": 1, "actor.W2": 2, "actor.b2": 1, "actor.W3": 2, "actor.b3": 1}
    for k, nd in shapes.items():
        a = tensors[k]
        if a.ndim != nd or a.dtype != np.float32 or not np.isfinite(a).all():
            raise SpecError(where, f"tensor {k!r} must be a finite float32 array of {nd} dimensions")
    W1, W2, W3 = tensors["actor.W1"], tensors["actor.W2"], tensors["actor.W3"]
    if W1.shape[0] != F or W2.shape[0] != W1.shape[1] or W3.shape != (W2.shape[1], K):
        raise SpecError(
            where,
            f"tensor shapes do not fit {K} domains and history {history} "
            f"(expected actor.W1 with {F} rows and actor.W3 with {K} columns)",
        )
    if (
        tensors["actor.b1"].shape != (W1.shape[1],)
        or tensors["actor.b2"].shape != (W2.shape[1],)
        or tensors["actor.b3"].shape != (K,)
    ):
        raise SpecError(where, "bias shapes do not match their layers")
    return {k: tensors[k] for k in ACTOR_KEYS}, {
        "domains": domains,
        "history": history,
        "horizon": horizon,
        "data_hash": meta.get("data_hash", ""),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


@register
class Agent(Strategy):
    name = "agent"
    signals = frozenset({VAL_LOSS})
    defaults: ClassVar[dict[str, Any]] = {
        "model": "",
        "sha256": "",
        "path": "",
        "match": "name",
        "horizon": 0,
    }

    def validate(self) -> None:
        p = self.params
        self._check_reference(p["sha256"], p["path"], p["model"])
        self.actor, self.meta = decode_model(p["model"])
        if p["sha256"] and p["sha256"] != self.meta["sha256"]:
            raise SpecError(
                "strategy.params.sha256",
                f"names the agent {p['sha256']}, but strategy.params.model holds the agent "
                f"{self.meta['sha256']} (sha256 of its bytes): not the agent the spec names",
            )
        if p["match"] not in MATCH_MODES:
            raise SpecError("strategy.params.match", f"{p['match']!r} is not one of {', '.join(MATCH_MODES)}")
        h = p["horizon"]
        if isinstance(h, bool) or not isinstance(h, int) or not 0 <= h <= MAX_HORIZON:
            raise SpecError(
                "strategy.params.horizon",
                f"must be an integer in [0, {MAX_HORIZON}] (0: the agent's own), got {h!r}",
            )
        trained, names = self.meta["domains"], self.spec.domain_names
        if len(trained) != self.K:
            raise SpecError(
                "domains",
                f"the agent was trained on {len(trained)} domains ({', '.join(trained)}); this job has {self.K} "
                f"({', '.join(names)}). Its network has one slot per domain of its domain space: collect "
                "trajectories over this job's domains and train an agent on them",
            )
        if p["match"] == "name":
            if sorted(trained) != sorted(names):
                unknown = sorted(set(names) - set(trained))
                raise SpecError(
                    "domains",
                    f"domain {unknown[0]!r} is not one the agent was trained on ({', '.join(trained)}); "
                    "set strategy.params.match: position to map the job's domains onto the agent's slots in order",
                )
            # job index -> agent slot, and back
            self.slot = np.array([trained.index(n) for n in names], dtype=np.int64)
        else:
            self.slot = np.arange(self.K, dtype=np.int64)
        self.horizon = h or self.meta["horizon"]

    @staticmethod
    def _check_reference(sha256: Any, path: Any, model: Any) -> None:
        """The reference's form: a sha256 of 64 lowercase hex digits, a path of bounded length,
        and a model present (a spec naming a file has it put there when the spec is loaded)."""
        if not isinstance(sha256, str) or (sha256 and not SHA256_RE.fullmatch(sha256)):
            raise SpecError(
                "strategy.params.sha256", f"must be 64 lowercase hex digits (sha256), got {sha256!r}"
            )
        if not isinstance(path, str) or len(path) > MAX_PATH_CHARS:
            raise SpecError(
                "strategy.params.path", f"must be a file path of at most {MAX_PATH_CHARS} characters"
            )
        if path and not sha256:
            raise SpecError(
                "strategy.params.sha256", f"required with strategy.params.path ({path}): the agent's sha256"
            )
        if path and not model:
            raise SpecError(
                "strategy.params.model",
                f"is empty: the spec names the agent file {path}, whose bytes go here when the spec is "
                "loaded from its file (`mixer job create SPEC`, `mixer pretrain`, the Megatron plug-in)",
            )

    def init(self, seed: int) -> State:
        H, K = self.meta["history"], self.K
        return {
            "t": 0,
            # job order; the segment before the first evaluation runs on version 0, the shaped prior
            "weights": np.tile(shape_weights(self.prior, self.prior, self.spec.cadence), (H, 1)),
            "losses": np.zeros((H, K)),
            "first_mean": 0.0,
            "val_step": -1,
            "skipped": 0,
            "superseded": 0,
            "proposal": self.prior.copy(),
        }

    def initial_weights(self, state: State) -> np.ndarray:
        return self.prior

    def update(self, state: State, window: Window) -> tuple[State, Decision | None]:
        new, latest = dict(state), None
        for r in window.reports:
            if r.val_loss is None or r.step <= new["val_step"]:
                continue
            if (
                not np.isfinite(r.val_loss).all()
                or (r.val_loss < MIN_LOSS).any()
                or (r.val_loss > MAX_LOSS).any()
            ):
                new["skipped"] += 1
                continue
            if latest is not None and r.step > latest.step:
                new["superseded"] += 1
            if latest is None or r.step > latest.step:
                latest = r
        if latest is None:
            return new, None
        loss = np.asarray(latest.val_loss, dtype=np.float64)
        if new["t"] == 0:
            new["first_mean"] = float(loss.mean())
            new["losses"] = np.tile(loss, (self.meta["history"], 1))
        else:
            new["losses"] = np.vstack([new["losses"][1:], loss])
        new["t"] += 1
        new["val_step"] = int(latest.step)
        inv = np.argsort(self.slot)  # agent slot -> job index
        x = state_features(
            new["weights"][:, inv], new["losses"][:, inv], new["first_mean"], new["t"], self.horizon
        )
        new["proposal"] = actor_forward(self.actor, x)[self.slot]
        # the history holds the weights the engine will apply (it shapes the decision so)
        new["weights"] = np.vstack(
            [new["weights"][1:], shape_weights(new["proposal"], self.prior, self.spec.cadence)]
        )
        params = {
            "agent_step": int(new["t"]),
            "skipped": int(new["skipped"]),
            "superseded": int(new["superseded"]),
            "data_hash": self.meta["data_hash"],
        }
        return new, Decision(weights=new["proposal"].copy(), params=params)
