"""DWM as Yu et al. (ICML 2025) give it: the batch-context weighting model and its in-batch
normalisation against a float64 re-derivation on stored inputs, the upper-level gradient against
autograd through one unrolled step of a tiny model, and transfer of a learned model to another job."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mixer.spec import JobSpec, SpecError
from mixer.transfer import TransferError, resolve_init_from
from mixer.weighting import dwm
from mixer.weighting.params import DwmParams

DATA = json.loads((Path(__file__).parent / "data" / "dwm_batch_context.json").read_text())


def stored() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], float]:
    params = {k: np.asarray(v, dtype=np.float64) for k, v in DATA["params"].items()}
    return np.asarray(DATA["x"], np.float64), np.asarray(DATA["s"], np.float64), params, float(DATA["eta"])


def softsign(a: np.ndarray) -> np.ndarray:
    return a / (1.0 + np.abs(a))


def weights_f64(x: np.ndarray, p: dict[str, np.ndarray]) -> np.ndarray:
    """The batch-context model and the in-batch normalisation, written out in float64 numpy."""
    e = softsign(x @ p["W1"] + p["b1"])
    c = e.mean(axis=0)
    h = softsign(e @ p["W2"] + c @ p["U"] + p["b2"])
    z = h @ p["w2"]
    q = np.exp(z - z.max())
    return len(z) * q / q.sum()


def test_forward_and_in_batch_normalisation_equal_the_float64_rederivation() -> None:
    x, _, p, _ = stored()
    want = weights_f64(x, p)
    assert abs(want.sum() - len(want)) < 1e-12 and want.std() > 0.05  # not uniform: the check bites
    got32 = dwm.evaluate(
        {k: v.astype(np.float32) for k, v in p.items()}, torch.tensor(x, dtype=torch.float32)
    )
    np.testing.assert_allclose(got32.numpy(), want, rtol=2e-6, atol=0)
    got64 = dwm.evaluate(p, torch.tensor(x))
    np.testing.assert_allclose(got64.numpy(), want, rtol=1e-12, atol=0)
    assert dwm.model_of(p) == "batch-context"


def test_a_samples_weight_depends_on_its_batch_only_under_batch_context() -> None:
    x, _, p, _ = stored()
    changed = x.copy()
    changed[-1] += 3.0  # only the last sample changes
    for model, keys in dwm.MODEL_KEYS.items():
        q = {k: p[k] for k in keys}
        w1, w2 = (dwm.evaluate(q, torch.tensor(b)).numpy() for b in (x, changed))
        drift = abs((w1[0] / w1[1]) / (w2[0] / w2[1]) - 1)
        if model == "batch-context":
            assert drift > 1e-3, "the rest of the batch had no effect on the relative weights"
        else:
            assert drift < 1e-12, "a per-sample model must ignore the rest of the batch"


def test_upper_gradient_equals_autograd_of_the_rederived_surrogate() -> None:
    x, s, p, eta = stored()
    phi = {k: torch.tensor(v, requires_grad=True) for k, v in p.items()}
    e = torch.nn.functional.softsign(torch.tensor(x) @ phi["W1"] + phi["b1"])
    h = torch.nn.functional.softsign(e @ phi["W2"] + e.mean(0) @ phi["U"] + phi["b2"])
    w = len(x) * torch.softmax(h @ phi["w2"], dim=0)
    (-eta * (torch.tensor(s) * w).sum()).backward()
    got = dwm.upper_gradient(p, torch.tensor(x), torch.tensor(s), eta)
    assert set(got) == set(dwm.BATCH_KEYS)
    for k in dwm.BATCH_KEYS:
        np.testing.assert_allclose(got[k].numpy(), phi[k].grad.numpy(), rtol=1e-10, atol=1e-13)
    # train_step (SGD) moves phi by lr times that gradient, in float32.
    lr = 0.1
    new = dwm.train_step({k: v.astype(np.float32) for k, v in p.items()}, x, s, eta, lr, optimizer="sgd")
    for k in dwm.BATCH_KEYS:
        np.testing.assert_allclose(new[k], p[k] - lr * phi[k].grad.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model", sorted(dwm.MODEL_KEYS))
def test_one_step_unrolled_gradient_equals_autograd_through_a_tiny_model(model: str) -> None:
    """dL_val(theta'(phi))/dphi by autograd through theta' = theta - eta/N sum_i w_i(phi) grad l_i(theta)
    equals the service's gradient from s_i = <grad l_i(theta), grad L_val(theta')>."""
    g = torch.Generator().manual_seed(5)
    n, d, classes, eta = 8, 4, 3, 0.7
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    a_val = torch.randn(16, d, generator=g, dtype=torch.float64)
    y_val = torch.randint(0, classes, (16,), generator=g)
    theta = torch.randn(d, classes, generator=g, dtype=torch.float64)

    def losses(t: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(inputs @ t, labels, reduction="none")

    fb = dwm.FeatureBuilder(num_domains=2, total_steps=10)
    x = fb.build(losses(theta, a, y).detach(), torch.arange(n) % 2, 3).double()
    p = {k: v.astype(np.float64) for k, v in dwm.init_params(x.shape[1], 6, seed=2, model=model).items()}
    p["w2"] = np.random.default_rng(3).normal(size=6)  # a trained-looking output layer

    phi = {k: torch.tensor(v, requires_grad=True) for k, v in p.items()}
    e = torch.nn.functional.softsign(x @ phi["W1"] + phi["b1"])
    if model == "batch-context":
        e = torch.nn.functional.softsign(e @ phi["W2"] + e.mean(0) @ phi["U"] + phi["b2"])
    w = dwm.in_batch_weights(e @ phi["w2"])
    th = theta.clone().requires_grad_(True)
    per_sample = torch.stack([torch.autograd.grad(l_i, th, retain_graph=True)[0] for l_i in losses(th, a, y)])
    theta_next = theta - eta / n * (w[:, None, None] * per_sample).sum(0)
    losses(theta_next, a_val, y_val).mean().backward()
    want = {k: phi[k].grad.numpy() for k in p}

    t2 = theta_next.detach().clone().requires_grad_(True)
    g_val = torch.autograd.grad(losses(t2, a_val, y_val).mean(), t2)[0]
    s = (per_sample * g_val).sum(dim=(1, 2))
    got = dwm.upper_gradient(p, x, s, eta / n)
    for k in dwm.MODEL_KEYS[model]:
        np.testing.assert_allclose(got[k].numpy(), want[k], rtol=1e-9, atol=1e-12)
        assert np.abs(want[k]).max() > 0 or k == "b2"
    # The validation gradient at theta (not theta') gives another, first-order, answer.
    t0 = theta.clone().requires_grad_(True)
    g0 = torch.autograd.grad(losses(t0, a_val, y_val).mean(), t0)[0]
    first_order = dwm.upper_gradient(p, x, (per_sample * g0).sum(dim=(1, 2)), eta / n)
    assert not np.allclose(first_order["W1"].numpy(), want["W1"], rtol=1e-6, atol=0)


def exported_model(num_domains: int = 3, num_topics: int = 0, model: str = "batch-context") -> bytes:
    cfg = DwmParams.parse({"model": model, "hidden": 4, "num_topics": num_topics})
    fb = dwm.FeatureBuilder.from_params(num_domains, cfg)
    params = dwm.init_params(fb.num_features, 4, seed=11, model=model)
    params["w2"] = np.linspace(-1, 1, 4, dtype=np.float32)
    fb.update([2.0, 3.0], [0, 1])
    return dwm.to_bytes(params, fb)


def test_initial_model_takes_the_transferred_tensors_and_refuses_misfits() -> None:
    blob = exported_model()
    cfg = DwmParams.parse(
        {"init_from": base64.b64encode(blob).decode(), "hidden": 32, "model": "mlp-features"}
    )
    params, builder = dwm.initial_model(cfg, 3, seed=0)
    source, source_builder = dwm.from_bytes(blob)
    # The blob's architecture and width win over the spec's; the running means start afresh.
    assert dwm.model_of(params) == "batch-context" and params["W1"].shape == source["W1"].shape
    assert all(np.array_equal(params[k], source[k]) for k in dwm.BATCH_KEYS)
    assert source_builder is not None and source_builder.domain_seen.any() and not builder.domain_seen.any()
    with pytest.raises(ValueError, match="model of 7 features; this job's features are 8"):
        dwm.initial_model(cfg, 4, seed=0)
    fresh, _ = dwm.initial_model(DwmParams.parse({}), 3, seed=0)
    assert dwm.model_of(fresh) == "batch-context" and not fresh["w2"].any()


def job_spec(init_from: str, num_domains: int = 3, **params) -> dict:
    return {
        "name": "t",
        "domains": [f"d{i}" for i in range(num_domains)],
        "strategy": {"name": "dwm", "params": {"stage_steps": 4}},
        "weighting": {"name": "dwm", "params": {"init_from": init_from, **params}},
    }


def test_spec_resolves_a_file_and_refuses_what_cannot_fit(tmp_path) -> None:
    from mixer.engine import Engine

    (tmp_path / "m.safetensors").write_bytes(exported_model())
    spec = resolve_init_from(job_spec("m.safetensors"), tmp_path)
    assert (
        base64.b64decode(spec["weighting"]["params"]["init_from"])
        == (tmp_path / "m.safetensors").read_bytes()
    )
    Engine(JobSpec.from_dict(spec))  # fits: 3 domains, no topics
    assert (
        resolve_init_from(job_spec("bm90IGEgZmlsZQ=="), tmp_path)["weighting"]["params"]["init_from"]
        == "bm90IGEgZmlsZQ=="
    )
    with pytest.raises(SpecError, match="init_from: holds a model of 7 features; this job needs 9"):
        Engine(JobSpec.from_dict(resolve_init_from(job_spec("m.safetensors", num_domains=5), tmp_path)))
    with pytest.raises(SpecError, match="init_from: is not base64"):
        Engine(JobSpec.from_dict(job_spec("no-such-file.safetensors")))
    with pytest.raises(SpecError, match="init_from: is not an exported DWM model"):
        Engine(JobSpec.from_dict(job_spec(base64.b64encode(b"\x05" * 40).decode())))
    with pytest.raises(SpecError, match="frozen: needs weighting.params.init_from"):
        Engine(JobSpec.from_dict(job_spec("", frozen=True)))
    (tmp_path / "big.safetensors").write_bytes(b"\0" * (1 << 20))
    with pytest.raises(TransferError, match="at most"):
        resolve_init_from(job_spec("big.safetensors"), tmp_path)


@pytest.mark.parametrize(
    ("given", "field"),
    [
        ({"model": "transformer"}, "model"),
        ({"hidden": 257}, "hidden"),
        ({"lr": 1.5}, "lr"),
        ({"eta": 1e7}, "eta"),
        ({"num_topics": (1 << 16) + 1}, "num_topics"),
        ({"seq_len": (1 << 24) + 1}, "seq_len"),
        ({"total_steps": 1 << 53}, "total_steps"),
        ({"init_from": "x" * (768 * 1024 + 1)}, "init_from"),
        ({"frozen": "yes"}, "frozen"),
    ],
)
def test_every_dwm_parameter_has_a_range(given: dict, field: str) -> None:
    with pytest.raises(SpecError, match=f"weighting.params.{field}"):
        DwmParams.parse(given)


def regression(
    dim: int, seed: int, phi: dict | None = None, learn: bool = False
) -> tuple[float, dict | None]:
    """A linear model of width `dim` on data with 30% corrupted labels, weighted by `phi` (learned
    alongside with the one-step-unrolled gradient when `learn`); returns (clean val loss, phi)."""
    batch, steps, lr = 64, 120, 0.1
    g = torch.Generator().manual_seed(seed)
    truth = torch.randn(dim, generator=g, dtype=torch.float64)
    x_val = torch.randn(256, dim, generator=g, dtype=torch.float64)
    y_val = x_val @ truth + 0.1 * torch.randn(256, generator=g, dtype=torch.float64)
    data = torch.Generator().manual_seed(10_000 + seed)
    fb = dwm.FeatureBuilder(num_domains=2, total_steps=steps)
    if learn:
        phi = dwm.init_params(fb.num_features, 16, seed)
    theta = torch.zeros(dim, dtype=torch.float64)
    for step in range(steps):
        x = torch.randn(batch, dim, generator=data, dtype=torch.float64)
        y = x @ truth + 0.1 * torch.randn(batch, generator=data, dtype=torch.float64)
        bad = torch.rand(batch, generator=data) < 0.3
        y = torch.where(bad, 3.0 * truth.norm() * torch.randn(batch, generator=data, dtype=torch.float64), y)
        domain = torch.randint(0, 2, (batch,), generator=data)
        residual = x @ theta - y
        grads = residual[:, None] * x
        w = torch.ones(batch, dtype=torch.float64)
        if phi is not None:
            features = fb.build(0.5 * residual**2, domain, step)
            w = dwm.evaluate(phi, features).double()
            if learn:
                theta_next = theta - lr * (w[:, None] * grads).mean(0)
                g_val = ((x_val @ theta_next - y_val)[:, None] * x_val).mean(0)
                phi = dwm.train_step(phi, features, grads @ g_val, eta=lr, lr=1e-2)
            fb.update(0.5 * residual**2, domain)
        theta = theta - lr * (w[:, None] * grads).mean(0)
    return 0.5 * ((x_val @ theta - y_val) ** 2).mean().item(), phi


def test_a_model_learned_at_one_width_helps_another_frozen() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # hundreds of tiny ops: thread hand-offs cost more than they save
    try:
        _, learned = regression(8, seed=0, learn=True)
        uniform, _ = regression(32, seed=100)
        transferred, _ = regression(32, seed=100, phi=learned)
    finally:
        torch.set_num_threads(before)
    # Measured: uniform 1.23, transferred 0.022 (learning at width 32 itself: 0.012).
    assert transferred < 0.1 * uniform, f"transferred {transferred:.4f} vs uniform {uniform:.4f}"
