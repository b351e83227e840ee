"""Use a trained Data Mixing Agent: load it, and make it the `agent` strategy of a job.

A job runs the agent through mixer/strategies/agent.py, which reads the policy network from the
spec (`strategy.params.model`: base64 safetensors of the actor alone, with the domains, history,
horizon and data hash in the header), so that the service and replay need nothing but the spec.
The spec names the agent by the sha256 of that file (actor.safetensors) and by its path.
`strategy_spec(folder)` builds that entry from the folder `mixer agent train` wrote.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mixer.agent.train import ACTOR, CARD, WEIGHTS, _metadata, actor_bytes
from mixer.strategies.agent import ACTOR_KEYS, FORMAT, actor_forward, decode_model

__all__ = ["AgentFileError", "LoadedAgent", "fresh_model", "load_agent", "strategy_spec"]


class AgentFileError(ValueError):
    """A saved agent that cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class LoadedAgent:
    """A trained agent: every tensor as saved, and its card."""

    tensors: dict[str, np.ndarray]
    card: dict[str, Any]

    @property
    def domains(self) -> list[str]:
        return list(self.card["domains"])

    def model_bytes(self) -> bytes:
        """The actor alone as canonical safetensors (actor.safetensors), the form a job spec carries."""
        return actor_bytes(self.tensors, self.card)

    @property
    def sha256(self) -> str:
        """The agent's name in a job spec: sha256 of model_bytes()."""
        return hashlib.sha256(self.model_bytes()).hexdigest()

    def propose(self, state: np.ndarray) -> np.ndarray:
        """The next weights for a state vector (see the card's `inputs`), as the strategy computes them."""
        return actor_forward(self.tensors, np.asarray(state, dtype=np.float64))


def load_agent(folder: Path) -> LoadedAgent:
    """Read agent.safetensors and agent.json from folder; AgentFileError if either is missing or they disagree."""
    import safetensors.numpy

    folder = Path(folder)
    card_path, weights_path = folder / CARD, folder / WEIGHTS
    for p in (card_path, weights_path):
        if not p.is_file():
            raise AgentFileError(f"{p}: not found (train an agent with `mixer agent train --out {folder}`)")
    try:
        card = json.loads(card_path.read_text())
    except ValueError as e:
        raise AgentFileError(f"{card_path}: not JSON ({e})") from None
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise AgentFileError(f"{card_path}: format is not {FORMAT!r}")
    data = weights_path.read_bytes()
    try:
        tensors = safetensors.numpy.load(data)
    except Exception as e:  # noqa: BLE001 - any parse failure is the same bad file
        raise AgentFileError(f"{weights_path}: not safetensors ({e})") from None
    size = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8 : 8 + size]).get("__metadata__", {})
    try:
        expected = _metadata(card)
    except (KeyError, TypeError) as e:
        raise AgentFileError(f"{card_path}: missing field {e}") from None
    if meta != expected:
        raise AgentFileError(
            f"{weights_path}: its metadata does not match {card_path} (files from different runs?)"
        )
    missing = [k for k in ACTOR_KEYS if k not in tensors]
    if missing:
        raise AgentFileError(f"{weights_path}: has no tensor {missing[0]!r}")
    agent = LoadedAgent(tensors, card)
    actor_path = folder / ACTOR
    if actor_path.is_file() and actor_path.read_bytes() != agent.model_bytes():
        raise AgentFileError(f"{actor_path}: is not the actor of {weights_path} (files from different runs?)")
    decode_model(base64.b64encode(agent.model_bytes()).decode())  # the shapes a job will check, checked now
    return agent


def strategy_spec(folder: Path, *, match: str = "name", horizon: int = 0) -> dict[str, Any]:
    """The `strategy:` entry of a job spec that runs this agent: named by sha256 and path, its bytes inline."""
    agent = load_agent(folder)
    actor_path = (Path(folder) / ACTOR).resolve()
    if not actor_path.is_file():  # a folder trained before actor.safetensors was written beside the rest
        actor_path.write_bytes(agent.model_bytes())
    params: dict[str, Any] = {
        "sha256": agent.sha256,
        "path": str(actor_path),
        "model": base64.b64encode(agent.model_bytes()).decode(),
        "match": match,
    }
    if horizon:
        params["horizon"] = horizon
    return {"name": "agent", "params": params}


def fresh_model(
    domains: list[str], *, history: int = 2, horizon: int = 8, hidden: int = 16, seed: int = 0
) -> str:
    """`strategy.params.model` for an untrained actor over `domains` (PyTorch's default uniform
    initialisation, from `seed`): the same layout a trained agent has, for exercising the strategy's
    mechanics (service, replay, property tests) without collecting trajectories first."""
    import safetensors.numpy

    from mixer.strategies.agent import num_features
    from mixer.strategies.dwm import canonical_safetensors

    if len(domains) < 1 or len(set(domains)) != len(domains):
        raise ValueError(f"domains must be distinct names, got {domains}")
    rng = np.random.Generator(np.random.PCG64(seed))
    sizes = [num_features(len(domains), history), hidden, hidden, len(domains)]
    tensors = {}
    for i, (a, b) in enumerate(itertools.pairwise(sizes), start=1):
        bound = 1.0 / np.sqrt(a)
        tensors[f"actor.W{i}"] = rng.uniform(-bound, bound, (a, b)).astype(np.float32)
        tensors[f"actor.b{i}"] = rng.uniform(-bound, bound, b).astype(np.float32)
    meta = {
        "format": FORMAT,
        "domains": json.dumps(list(domains)),
        "history": str(history),
        "horizon": str(horizon),
        "data_hash": "",
    }
    return base64.b64encode(canonical_safetensors(safetensors.numpy.save(tensors, metadata=meta))).decode()
