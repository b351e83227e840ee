"""PRESENCE self-influence reweighting: closed-form scores, the weight formula, the stage switch."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.func import functional_call, grad, vmap

from mixer.megatron.instance import InstanceWeighting
from mixer.spec import JobSpec, SpecError
from mixer.weighting import METHODS, parse_weighting_params
from mixer.weighting.params import PresenceParams
from mixer.weighting.presence import (
    output_layer_self_influence,
    output_layer_self_influence_np,
    presence_weights,
    temperature,
    weights_for_step,
)

DATA = json.loads((Path(__file__).parent / "data" / "presence_cases.json").read_text())


class TinyLM(torch.nn.Module):
    """Embedding, one tanh layer, output layer: enough depth that h depends on the input."""

    def __init__(self, vocab: int, hidden: int, bias: bool, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden, dtype=dtype)
        self.mix = torch.nn.Linear(hidden, hidden, dtype=dtype)
        self.out = torch.nn.Linear(hidden, vocab, bias=bias, dtype=dtype)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.mix(self.embed(tokens)))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(tokens))


def token_mean_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    ce = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none"
    )
    ce = ce.reshape(labels.shape)
    return (ce * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def paper_weights(scores: list[float], tau: float, normalize: str) -> np.ndarray:
    """N exp(s_i / tau) / sum_j exp(s_j / tau), re-derived in float64 (mean-normalised on request)."""
    s = np.asarray(scores, dtype=np.float64)
    if normalize == "mean":
        s = s / s.mean()
    e = np.exp(s / tau - np.max(s / tau))
    return len(s) * e / e.sum()


# ---- scores: closed form == autograd's per-sample gradient norms ----------------------------


@pytest.mark.parametrize(
    "vocab,hidden,seq,bias",
    [(11, 7, 3, False), (5, 4, 20, False), (9, 6, 8, True)],
    ids=["gram-form", "product-form", "with-bias"],
)
def test_scores_equal_autograd_per_sample_gradient_norms(
    vocab: int, hidden: int, seq: int, bias: bool
) -> None:
    torch.manual_seed(0)
    model = TinyLM(vocab, hidden, bias)
    b = 6
    tokens = torch.randint(0, vocab, (b, seq))
    labels = torch.randint(0, vocab, (b, seq))
    mask = (torch.rand(b, seq) < 0.7).double()
    mask[0] = 0.0  # a sample without loss tokens: zero loss, zero gradient
    mask[1] = 1.0

    params = {k: v.detach() for k, v in model.named_parameters()}

    def sample_loss(p, tok, lab, m):
        logits = functional_call(model, p, (tok[None],))
        return token_mean_loss(logits, lab[None], m[None])[0]

    g = vmap(grad(sample_loss), in_dims=(None, 0, 0, 0))(params, tokens, labels, mask)
    want = g["out.weight"].square().sum(dim=(1, 2))
    if bias:
        want = want + g["out.bias"].square().sum(dim=1)

    with torch.no_grad():
        h = model.hidden(tokens)
        logits = model.out(h)
    got = output_layer_self_influence(h, logits, labels, mask, bias=bias)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    assert got[0].item() == 0.0
    if not bias:
        np.testing.assert_allclose(
            output_layer_self_influence_np(h.numpy(), logits.numpy(), labels.numpy(), mask.numpy()),
            want.numpy(),
            rtol=1e-10,
        )
    # The per-token shortcut sum_t ||delta_t||^2 ||h_t||^2 drops the cross terms: not the norm.
    p = torch.softmax(logits, -1)
    p[torch.arange(b)[:, None], torch.arange(seq)[None], labels] -= 1
    diag = (p.square().sum(-1) * h.square().sum(-1) * mask).sum(-1) / mask.sum(-1).clamp(min=1) ** 2
    assert not torch.allclose(diag[1:], want[1:], rtol=1e-3)


def test_scores_reject_mismatched_shapes() -> None:
    h, z = torch.zeros(2, 3, 4), torch.zeros(2, 3, 5)
    with pytest.raises(ValueError, match="hidden must be"):
        output_layer_self_influence(h, torch.zeros(2, 4, 5), torch.zeros(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="labels and loss_mask"):
        output_layer_self_influence(h, z, torch.zeros(2, 4), torch.ones(2, 3))


# ---- weights: the paper's formula, stages -------------------------------------------------


@pytest.mark.parametrize(
    "case", DATA["weight_cases"], ids=lambda c: f"n{len(c['scores'])}-{c['params']['normalize']}"
)
def test_weights_equal_the_paper_formula_in_float64(case: dict) -> None:
    p = PresenceParams.parse(case["params"])
    for step in case["steps"]:
        tau = p.tau_1 if step < p.switch_step else p.tau_2
        want = paper_weights(case["scores"], tau, p.normalize)
        for dtype in (torch.float64, torch.float32):
            got = weights_for_step(step, torch.tensor(case["scores"], dtype=dtype), case["params"])
            assert got.dtype == torch.float32 and not got.requires_grad
            np.testing.assert_allclose(got.numpy(), want, rtol=2e-6, atol=1e-7)
            assert math.isclose(float(got.double().sum()), len(case["scores"]), rel_tol=1e-6)


@pytest.mark.parametrize("case", [c for c in DATA["weight_cases"] if len(set(c["scores"])) > 2])
def test_stage_switch_happens_at_the_announced_step(case: dict) -> None:
    p = PresenceParams.parse(case["params"])
    s = np.asarray(case["scores"])
    scores = torch.tensor(s)
    before, at = max(p.switch_step - 1, 0), p.switch_step
    assert temperature(at, p) == p.tau_2
    if p.switch_step > 0:
        assert temperature(before, p) == p.tau_1
        w = weights_for_step(before, scores, p).numpy()
        # Stage 1 orders the weights like the scores; stage 2 reverses the order.
        assert np.argmax(w) == np.argmax(s) and np.argmin(w) == np.argmin(s)
    w = weights_for_step(at, scores, p).numpy()
    assert np.argmax(w) == np.argmin(s) and np.argmin(w) == np.argmax(s)
    order = np.argsort(s, kind="stable")
    assert np.all(np.diff(w[order]) <= 1e-7)


def test_uniform_scores_give_uniform_weights() -> None:
    w = presence_weights(torch.full((7,), 3.5), 0.01)
    np.testing.assert_allclose(w.numpy(), np.ones(7), rtol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_bad_scores_raise_a_clear_error(bad: float) -> None:
    s = torch.tensor([1.0, 2.0, bad])
    with pytest.raises(ValueError, match="global sample index 2"):
        presence_weights(s, 1.0)
    # The worker path skips the host sync: the bad score surfaces as a non-finite weight.
    if not bad < 0:
        assert not torch.isfinite(presence_weights(s, 1.0, check=False)).all()


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="1-D"):
        presence_weights(torch.ones(2, 2), 1.0)
    with pytest.raises(ValueError, match="empty"):
        presence_weights(torch.ones(0), 1.0)
    with pytest.raises(ValueError, match="floating point"):
        presence_weights(torch.ones(3, dtype=torch.int64), 1.0)
    with pytest.raises(ValueError, match="non-zero"):
        presence_weights(torch.ones(3), 0.0)
    with pytest.raises(ValueError, match="normalize"):
        presence_weights(torch.ones(3), 1.0, "max")
    with pytest.raises(ValueError, match="step must be"):
        temperature(-1, PresenceParams())


# ---- parameters in the job spec ------------------------------------------------------------


def spec(params: dict) -> JobSpec:
    return JobSpec.from_dict(
        {"name": "job", "domains": ["a", "b"], "weighting": {"name": "presence", "params": params}}
    )


def test_params_schema_and_ranges() -> None:
    assert METHODS["presence"] == {"tau_1", "tau_2", "switch_step", "normalize"}
    s = spec({"tau_1": 0.5, "tau_2": -2, "switch_step": 10, "normalize": "mean"})
    assert parse_weighting_params("presence", s.weighting.params) == PresenceParams(
        tau_1=0.5, tau_2=-2.0, switch_step=10, normalize="mean"
    )
    assert PresenceParams.parse(PresenceParams().to_dict()) == PresenceParams()
    bad = [
        ({"tau_1": -1.0}, "tau_1"),
        ({"tau_1": 0}, "tau_1"),
        ({"tau_1": 2e6}, "tau_1"),
        ({"tau_1": True}, "tau_1"),
        ({"tau_2": 1.0}, "tau_2"),
        ({"tau_2": float("-inf")}, "tau_2"),
        ({"switch_step": -1}, "switch_step"),
        ({"switch_step": 1.5}, "switch_step"),
        ({"switch_step": 1 << 60}, "switch_step"),
        ({"normalize": "max"}, "normalize"),
        ({"temperature": 1.0}, "temperature"),
    ]
    for params, field in bad:
        with pytest.raises(SpecError, match=f"weighting.params.{field}"):
            spec(params)


def test_worker_weighting_follows_the_version_params() -> None:
    s = spec({"tau_1": 1.0, "tau_2": -1.0, "switch_step": 3})
    w = InstanceWeighting(s)
    assert w.enabled and w.needs_self_influence
    scores = torch.tensor([0.1, 2.0, 0.5, 1.0])
    loss, dom = torch.ones(4), torch.zeros(4, dtype=torch.long)
    np.testing.assert_allclose(
        w.weights(2, loss, dom, scores=scores).numpy(), paper_weights(scores.tolist(), 1.0, "none"), rtol=1e-6
    )
    np.testing.assert_allclose(
        w.weights(3, loss, dom, scores=scores).numpy(),
        paper_weights(scores.tolist(), -1.0, "none"),
        rtol=1e-6,
    )
    from mixer.megatron.versions import VersionUpdate

    w.offer(
        VersionUpdate(
            version=1,
            weights=[0.5, 0.5],
            effective_step=0,
            params={"weighting": {"switch_step": 10, "tau_1": 0.25}},
        )
    )
    w.sync(1)
    np.testing.assert_allclose(
        w.weights(3, loss, dom, scores=scores).numpy(),
        paper_weights(scores.tolist(), 0.25, "none"),
        rtol=1e-6,
    )
    with pytest.raises(ValueError, match="self-influence score per sample"):
        w.weights(3, loss, dom)


# ---- the two stages on a toy with corrupted samples ------------------------------------------


def test_stage_two_gives_corrupted_samples_lower_weight() -> None:
    """Clean samples follow next = (token + 1) mod V; corrupted ones have random labels. Train with
    PRESENCE through both stages; in stage 2 the corrupted samples get the lower weights."""
    cfg = DATA["corrupted_toy"]
    params = PresenceParams.parse({**cfg["params"], "switch_step": cfg["switch_step"]})
    V, H, S, B, C = cfg["vocab"], cfg["hidden"], cfg["seq"], cfg["batch"], cfg["corrupt"]
    g = torch.Generator().manual_seed(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    model = TinyLM(V, H, bias=False)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])

    def batch():
        start = torch.randint(0, V, (B, 1), generator=g)
        tokens = (start + torch.arange(S)) % V
        labels = (tokens + 1) % V
        bad = torch.randperm(B, generator=g)[:C]
        labels[bad] = torch.randint(0, V, (C, S), generator=g)
        return tokens, labels, bad

    mask = torch.ones(B, S, dtype=torch.float64)
    gaps = []
    for step in range(cfg["steps"]):
        tokens, labels, bad = batch()
        h = model.hidden(tokens)
        logits = model.out(h)
        scores = output_layer_self_influence(h, logits, labels, mask)
        w = weights_for_step(step, scores, params)
        loss = (w.double() * token_mean_loss(logits, labels, mask)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        clean = torch.ones(B, dtype=torch.bool)
        clean[bad] = False
        gaps.append(
            (
                step,
                float(w[~clean].mean() - w[clean].mean()),
                float(scores[~clean].mean() / scores[clean].mean()),
            )
        )
    late = [(st, gap, ratio) for st, gap, ratio in gaps if st >= params.switch_step + 10]
    # Corrupted samples have the larger self-influence once the clean rule is learnt ...
    assert all(ratio > 2 for _, _, ratio in late), late
    # ... stage 1 favours them, stage 2 weights them below the clean ones.
    assert all(gap > 0 for st, gap, _ in gaps[10 : params.switch_step]), gaps[10 : params.switch_step]
    assert all(gap < 0 for _, gap, _ in late), late


# ---- gathered over data-parallel ranks ---------------------------------------------------------


def _dist_worker(
    rank: int, world: int, init_file: str, out_dir: str, scores: list[float], tau: float
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        n = len(scores) // world
        local = torch.tensor(scores[rank * n : (rank + 1) * n], dtype=torch.float32)
        np.save(f"{out_dir}/rank{rank}.npy", presence_weights(local, tau, "mean").numpy())
    finally:
        dist.destroy_process_group()


def test_weights_are_normalised_over_the_data_parallel_batch() -> None:
    case = DATA["weight_cases"][1]
    tau = case["params"]["tau_1"]
    with tempfile.TemporaryDirectory() as d:
        args = (2, f"{d}/init", d, case["scores"], tau)
        mp.start_processes(_dist_worker, args=args, nprocs=2, join=True, start_method="fork")
        got = np.concatenate([np.load(f"{d}/rank{r}.npy") for r in range(2)])
    np.testing.assert_allclose(got, paper_weights(case["scores"], tau, "mean"), rtol=2e-6)
