"""DWM: the weighting model, its one-step-unrolled trainer, features, blobs, and that it learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixer.weighting import dwm
from mixer.weighting.params import DwmParams


def trained_like(num_features: int = 7, hidden: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    p = dwm.init_params(num_features, hidden, seed, model="mlp-features")
    p["w2"] = np.random.default_rng(seed).normal(size=hidden).astype(np.float32)
    p["b1"] = np.random.default_rng(seed + 1).normal(size=hidden).astype(np.float32)
    return p


def test_fresh_model_is_uniform_and_weights_are_detached() -> None:
    p = dwm.init_params(7, 16, seed=1, model="mlp-features")
    x = torch.randn(33, 7, requires_grad=True)
    assert torch.allclose(dwm.evaluate(p, x), torch.ones(33))
    w = dwm.evaluate(trained_like(), x)
    assert not w.requires_grad and w.sum().item() == pytest.approx(33, rel=1e-5)
    assert w.std() > 0


def test_evaluate_accepts_prepared_tensors() -> None:
    p = trained_like()
    x = torch.randn(10, 7)
    assert torch.equal(dwm.evaluate(dwm.to_torch(p), x), dwm.evaluate(p, x))


def test_non_finite_or_misshapen_features_raise() -> None:
    x = torch.randn(4, 7)
    x[2, 0] = float("nan")
    with pytest.raises(ValueError, match="global sample 2 contain NaN or Inf"):
        dwm.evaluate(trained_like(), x)
    x[2, 0] = float("inf")
    with pytest.raises(ValueError, match="global sample 2 contain NaN or Inf"):
        dwm.evaluate(trained_like(), x)
    with pytest.raises(ValueError, match="sample 2 contain NaN or Inf"):
        dwm.train_step(trained_like(), x, torch.ones(4), 1.0, 0.1)
    with pytest.raises(ValueError, match=r"shape \(batch >= 1, 7\)"):
        dwm.evaluate(trained_like(), torch.randn(4, 6))
    with pytest.raises(ValueError, match="finite alignment scores"):
        dwm.train_step(trained_like(), torch.randn(4, 7), torch.tensor([1.0, float("inf"), 0, 0]), 1.0, 0.1)


def test_train_step_follows_the_one_step_unrolled_gradient() -> None:
    """SGD with lr 1 moves phi by exactly -dJ/dphi, J = -eta sum_i s_i w_i; checked by hand in float64."""
    p = trained_like()
    rng = np.random.default_rng(3)
    x = rng.normal(size=(9, 7))
    s = rng.normal(size=9)
    eta, n = 0.7, 9
    W1, b1, w2 = (p[k].astype(np.float64) for k in ("W1", "b1", "w2"))
    a = x @ W1 + b1
    h = a / (1 + np.abs(a))  # softsign
    z = h @ w2
    q = np.exp(z - z.max())
    q /= q.sum()
    dz = -eta * n * q * (s - q @ s)  # dJ/dz_i through the softmax
    da = dz[:, None] * w2 / (1 + np.abs(a)) ** 2
    grad = {"w2": h.T @ dz, "b1": da.sum(0), "W1": x.T @ da}
    new = dwm.train_step(p, torch.tensor(x), torch.tensor(s), eta, 1.0, optimizer="sgd")
    for k in dwm.MLP_KEYS:
        np.testing.assert_allclose(p[k] - new[k], grad[k], rtol=1e-4, atol=1e-5)


def test_train_step_is_pure_and_keeps_adam_state() -> None:
    p = trained_like()
    before = {k: v.copy() for k, v in p.items()}
    x, s = torch.randn(8, 7), torch.randn(8)
    p1 = dwm.train_step(p, x, s, 1.0, 1e-2)
    assert all(np.array_equal(p[k], before[k]) for k in before) and set(p) == set(before)
    assert int(p1["opt.t"]) == 1 and {f"opt.{m}.{k}" for m in "mv" for k in dwm.MLP_KEYS} <= set(p1)
    p2 = dwm.train_step(p1, x, s, 1.0, 1e-2)
    assert int(p2["opt.t"]) == 2
    # Adam's first step moves every coordinate with a gradient by about lr.
    moved = np.abs(p1["w2"] - p["w2"])
    assert np.allclose(moved[moved > 0], 1e-2, rtol=1e-3)
    # Deterministic: same inputs, same bits (replay depends on it).
    again = dwm.train_step(p, x, s, 1.0, 1e-2)
    assert all(np.array_equal(again[k], p1[k]) for k in p1)


def test_feature_builder_layout_and_running_means() -> None:
    fb = dwm.FeatureBuilder(num_domains=3, num_topics=4, seq_len=100, total_steps=1000, momentum=0.5)
    assert fb.num_features == 4 + 3 + 4
    fb.update(torch.tensor([2.0, 4.0, 10.0]), torch.tensor([0, 0, 2]))
    np.testing.assert_allclose(fb.domain_mean, [3.0, 0.0, 10.0])
    fb.update(np.array([5.0]), np.array([0]))
    np.testing.assert_allclose(fb.domain_mean, [4.0, 0.0, 10.0])  # 0.5 * 3 + 0.5 * 5; others unchanged
    x = fb.build(
        torch.tensor([6.0, 1.0]),
        torch.tensor([0, 1]),
        250,
        topics=torch.tensor([[1, 3], [-1, -1]]),
        lengths=torch.tensor([50, 100]),
    )
    np.testing.assert_allclose(
        x.numpy(),
        [[6.0, 2.0, 0.5, 0.25, 1, 0, 0, 0, 0.5, 0, 0.5], [1.0, 0.0, 1.0, 0.25, 0, 1, 0, 0, 0, 0, 0]],
    )
    assert fb.build(torch.tensor([1.0]), [2], 5000)[0, 3] == 1.0  # progress saturates
    unknown = fb.build(torch.tensor([1.0, 1.0]), [0, 0], 0, topics=torch.tensor([[9, -1], [9, 2]]))
    assert unknown[0, 7:].tolist() == [0, 0, 0, 0] and unknown[1, 7:].tolist() == [0, 0, 1, 0]
    with pytest.raises(ValueError, match="padded with -1"):
        fb.build(torch.tensor([1.0]), [0], 0, topics=torch.tensor([-3]))
    with pytest.raises(ValueError, match=r"domain ids must lie in \[0, 3\)"):
        fb.build(torch.tensor([1.0]), [3], 0)
    with pytest.raises(ValueError, match="NaN or Inf"):
        fb.update([float("nan")], [0])
    # Compact: the state is two K-vectors, however many samples went through.
    assert sum(v.nbytes for v in fb.state_dict().values()) == 3 * 8 + 3


def test_blob_round_trip_and_format() -> None:
    fb = dwm.FeatureBuilder.from_params(2, DwmParams.parse({"num_topics": 1, "seq_len": 512}))
    fb.update([3.0], [1])
    p = dwm.train_step(
        trained_like(fb.num_features), torch.randn(4, fb.num_features), torch.randn(4), 1.0, 1e-3
    )
    blob = dwm.to_bytes(p, fb)
    assert b"__metadata__" in blob[:2048] and b"mixer.dwm/1" in blob[:2048]  # safetensors, not pickle
    q, fb2 = dwm.from_bytes(blob)
    assert set(q) == set(dwm.MLP_KEYS)  # the worker's blob leaves the optimiser out
    assert all(np.array_equal(q[k], p[k]) for k in dwm.MLP_KEYS)
    assert fb2 is not None and fb2.config() == fb.config() and np.array_equal(fb2.domain_mean, fb.domain_mean)
    full, none = dwm.from_bytes(dwm.to_bytes(p, include_optimizer=True))
    assert none is None and all(np.array_equal(full[k], p[k]) for k in p)
    with pytest.raises(ValueError, match="not a DWM blob"):
        dwm.from_bytes(b"garbage")
    with pytest.raises(ValueError, match="feature layout gives"):
        dwm.from_bytes(dwm.to_bytes(trained_like(5), fb))


def test_service_update_then_worker_weights() -> None:
    cfg = DwmParams.parse({"hidden": 8, "lr": 1e-2})
    fb = dwm.FeatureBuilder.from_params(2, cfg)
    p = dwm.init_params(fb.num_features, cfg.hidden, seed=0, model="mlp-features")
    losses, domains = torch.tensor([1.0, 5.0, 2.0, 6.0]), torch.tensor([0, 1, 0, 1])
    batch = dwm.SampleBatch(step=10, losses=losses, domains=domains, s=torch.tensor([1.0, -1.0, 1.0, -1.0]))
    p = dwm.service_update(p, fb, cfg, [batch, batch])
    assert int(p["opt.t"]) == 2 and fb.domain_seen.all()
    np.testing.assert_allclose(fb.domain_mean, [1.5, 5.5])  # updated after training, once per batch
    params, builder = dwm.from_bytes(dwm.to_bytes(p, fb))
    w = dwm.weights_for_step(11, losses, domains, params, builder)
    assert w[0] > w[1] and w[2] > w[3]  # moved towards the samples aligned with validation


# --- it learns: linear regression with 30% corrupted labels (as in Sow et al.'s linear experiments) ---

D, B, STEPS, FRACTION, LR = 10, 64, 300, 0.3, 0.05


def regression_run(seed: int, use_dwm: bool, model: str = "mlp-features") -> tuple[float, float, float]:
    """Train a linear model; return (clean validation loss, mean weight corrupted, mean weight clean)."""
    g = torch.Generator().manual_seed(seed)
    theta_star = torch.randn(D, generator=g, dtype=torch.float64)
    x_val = torch.randn(256, D, generator=g, dtype=torch.float64)
    y_val = x_val @ theta_star + 0.1 * torch.randn(256, generator=g, dtype=torch.float64)
    data = torch.Generator().manual_seed(10_000 + seed)  # the same stream for both arms

    def draw() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x = torch.randn(B, D, generator=data, dtype=torch.float64)
        y = x @ theta_star + 0.1 * torch.randn(B, generator=data, dtype=torch.float64)
        bad = torch.rand(B, generator=data) < FRACTION
        noise = 3.0 * theta_star.norm() * torch.randn(B, generator=data, dtype=torch.float64)
        return x, torch.where(bad, noise, y), bad, torch.randint(0, 2, (B,), generator=data)

    fb = dwm.FeatureBuilder(num_domains=2, total_steps=STEPS)
    phi = dwm.init_params(fb.num_features, 16, seed, model=model)
    theta = torch.zeros(D, dtype=torch.float64)
    for step in range(STEPS):
        x, y, _, dom = draw()
        residual = x @ theta - y
        grads = residual[:, None] * x  # grad of l_i = residual_i^2 / 2
        w = torch.ones(B, dtype=torch.float64)
        if use_dwm:
            features = fb.build(0.5 * residual**2, dom, step)
            w = dwm.evaluate(phi, features).double()
            grad_val = ((x_val @ theta - y_val)[:, None] * x_val).mean(0)
            phi = dwm.train_step(phi, features, grads @ grad_val, eta=LR, lr=1e-2)
            fb.update(0.5 * residual**2, dom)
        theta = theta - LR * (w[:, None] * grads).mean(0)
    val = 0.5 * ((x_val @ theta - y_val) ** 2).mean().item()
    x, y, bad, dom = draw()
    w = dwm.evaluate(phi, fb.build(0.5 * (x @ theta - y) ** 2, dom, STEPS))
    return val, w[bad].mean().item(), w[~bad].mean().item()


@pytest.fixture
def one_thread():
    # Hundreds of tiny ops: thread hand-offs cost more than they save on a shared 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("seed", "model"),
    [
        (0, "mlp-features"),
        (1, "mlp-features"),
        (2, "mlp-features"),
        (0, "batch-context"),
        (1, "batch-context"),
    ],
)
def test_dwm_learns_to_down_weight_corrupted_labels(seed: int, model: str, one_thread) -> None:
    uniform_val, _, _ = regression_run(seed, use_dwm=False)
    val, w_bad, w_clean = regression_run(seed, use_dwm=True, model=model)
    # Observed ratios 0.14-0.53 over seeds 0-5: a corrupted label that lands near the truth looks clean.
    assert w_bad < 0.75 * w_clean, f"seed {seed}: corrupted mean weight {w_bad:.3f} vs clean {w_clean:.3f}"
    assert val < 0.2 * uniform_val, f"seed {seed}: DWM val loss {val:.4f} vs uniform {uniform_val:.4f}"
