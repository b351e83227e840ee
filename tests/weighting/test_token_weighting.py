"""Token-level weighting (TLDR `token-loss`, PRIOR `token-reference`) inside the training loss:
weights and loss against a float64 re-derivation of the papers' formulas on stored inputs,
gradients against autograd, no host sync on the path, and one global batch over data parallelism."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from mixer.errors import SpecError
from mixer.megatron.instance import InstanceWeighting
from mixer.megatron.loss import compute_loss
from mixer.spec import JobSpec
from mixer.weighting import parse_weighting_params
from mixer.weighting.token import (
    REPORT_EXTRA_PREFIX,
    domain_mean_weight,
    report_extra,
    token_weights,
    token_weights_np,
)

DATA = json.loads((Path(__file__).parent / "data" / "token_cases.json").read_text())
CASES = DATA["cases"]
K = DATA["num_domains"]


def inputs(dtype=torch.float64):
    logits = torch.tensor(DATA["logits"], dtype=dtype, requires_grad=True)
    labels = torch.tensor(DATA["labels"])
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    mask = torch.tensor(DATA["loss_mask"], dtype=dtype)
    ref = torch.tensor(DATA["reference_token_loss"], dtype=dtype)
    return logits, labels, per_token, mask, ref, torch.tensor(DATA["dataset_id"])


def paper_weights(case: dict, token_loss: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """TLDR's formula and the PRIOR weight the module states, in float64, element by element, then
    the shared rescaling to N."""
    if case["method"] == "token-loss":  # TLDR: w = cos(pi exp(-l)) + 1
        raw = np.vectorize(lambda x: math.cos(math.pi * math.exp(-x)) + 1.0)(token_loss)
    else:  # PRIOR: w = (1 - p_ref)^alpha
        alpha = case["params"].get("alpha", 1.0)
        raw = np.vectorize(lambda x: (1.0 - math.exp(-x)) ** alpha)(ref)
    w = raw * mask
    return w * mask.sum() / w.sum()


@pytest.mark.parametrize("i", range(len(CASES)))
def test_weights_and_loss_equal_the_float64_rederivation(i: int) -> None:
    case = CASES[i]
    _, _, per_token, mask, ref, domain = inputs()
    params = parse_weighting_params(case["method"], case["params"])
    w = token_weights(case["method"], params, 0, per_token, mask, ref)
    want = paper_weights(case, per_token.detach().numpy(), ref.numpy(), mask.numpy())
    np.testing.assert_allclose(w.numpy(), want, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(w.numpy(), np.asarray(case["weights"]), rtol=1e-10, atol=1e-14)
    alpha = case["params"].get("alpha", 1.0)
    np.testing.assert_allclose(
        token_weights_np(case["method"], per_token.detach().numpy(), mask.numpy(), ref.numpy(), alpha),
        want,
        rtol=1e-12,
        atol=1e-14,
    )
    assert not w.requires_grad
    assert w.sum().item() == pytest.approx(mask.sum().item(), rel=1e-12)
    loss, stats = compute_loss(per_token, mask, domain, K, token_weights=w)
    want_loss = float((want * per_token.detach().numpy() * mask.numpy()).sum() / mask.numpy().sum())
    assert loss.item() == pytest.approx(want_loss, rel=1e-12)
    assert loss.item() == pytest.approx(case["loss"], rel=1e-10)
    # The statistics stay unweighted.
    plain = (per_token.detach() * mask).sum(1)
    np.testing.assert_allclose(stats.sample_loss.double().numpy(), (plain / mask.sum(1)).numpy(), rtol=1e-6)
    # Float32, as training runs it, within float32 rounding.
    _, _, pt32, m32, ref32, _ = inputs(torch.float32)
    w32 = token_weights(case["method"], params, 0, pt32, m32, ref32)
    np.testing.assert_allclose(w32.double().numpy(), want, rtol=2e-5, atol=1e-6)
    # Per-domain mean token weight for the report.
    dm = domain_mean_weight(w, mask, domain, K)
    extra = report_extra(dm.numpy(), K)
    for d, v in enumerate(case["domain_mean_weight"]):
        key = f"{REPORT_EXTRA_PREFIX}{d}"
        if v is None:
            assert key not in extra
        else:
            assert extra[key] == pytest.approx(v, rel=1e-6)


@pytest.mark.parametrize("i", range(len(CASES)))
def test_gradient_matches_autograd(i: int) -> None:
    case = CASES[i]
    logits, _, per_token, mask, ref, domain = inputs()
    params = parse_weighting_params(case["method"], case["params"])
    w = token_weights(case["method"], params, 0, per_token, mask, ref)
    loss, _ = compute_loss(per_token, mask, domain, K, token_weights=w)
    (grad,) = torch.autograd.grad(loss, logits)
    # d loss / d z = w_t m_t (softmax(z_t) - onehot(y_t)) / N, with w a constant of the step.
    z = np.asarray(DATA["logits"])
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    onehot = np.eye(z.shape[-1])[np.asarray(DATA["labels"])]
    m = np.asarray(DATA["loss_mask"])
    want = np.asarray(case["weights"])[..., None] * m[..., None] * (p - onehot) / m.sum()
    np.testing.assert_allclose(grad.numpy(), want, rtol=1e-9, atol=1e-14)


@contextlib.contextmanager
def no_host_sync():
    """Any tensor -> host read (.item, .cpu, .tolist, .numpy, bool/float/int) raises."""

    def refuse(name):
        def f(*args, **kwargs):
            raise AssertionError(f"host sync: Tensor.{name} called on the weighting path")

        return f

    names = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__")
    saved = {n: getattr(torch.Tensor, n) for n in names}
    try:
        for n in names:
            setattr(torch.Tensor, n, refuse(n))
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


@pytest.mark.parametrize("method", ["token-loss", "token-reference"])
def test_instance_weighting_path_has_no_host_sync(method: str) -> None:
    spec = JobSpec.from_dict(
        {
            "name": "tok",
            "domains": [f"d{i}" for i in range(K)],
            "strategy": "static",
            "weighting": {"name": method, "params": {}},
        }
    )
    iw = InstanceWeighting(spec)
    assert iw.token_level and iw.needs_reference == (method == "token-reference")
    _, _, per_token, mask, ref, domain = inputs(torch.float32)
    with no_host_sync():
        w = iw.token_weights(5, per_token, mask, ref)
        sw = iw.weights(5, per_token.detach().mean(1), domain)
        loss, _ = compute_loss(per_token, mask, domain, K, instance_weights=sw, token_weights=w)
        domain_mean_weight(w, mask, domain, K)
    case = next(c for c in CASES if c["method"] == method and c["params"].get("alpha", 1.0) == 1.0)
    assert loss.item() == pytest.approx(case["loss"], rel=1e-5)
    np.testing.assert_allclose(sw.numpy(), np.ones(len(DATA["labels"])))
    # The guard does catch a sync.
    with no_host_sync(), pytest.raises(AssertionError, match="host sync"):
        w.sum().item()


@pytest.mark.gpu
def test_cuda_path_does_not_synchronise() -> None:
    _, _, per_token, mask, ref, domain = inputs(torch.float32)
    per_token, mask, ref, domain = (t.detach().cuda() for t in (per_token, mask, ref, domain))
    params = parse_weighting_params("token-reference", {"alpha": 2.0})
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        w = token_weights("token-reference", params, 0, per_token, mask, ref)
        compute_loss(per_token, mask, domain, K, token_weights=w)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_burn_in_gives_uniform_weights_then_reweights() -> None:
    _, _, per_token, mask, ref, _ = inputs()
    p = parse_weighting_params("token-reference", {"alpha": 2.5, "burn_in": 3})
    np.testing.assert_array_equal(
        token_weights("token-reference", p, 2, per_token, mask, ref).numpy(), mask.numpy()
    )
    assert not np.allclose(token_weights("token-reference", p, 3, per_token, mask, ref).numpy(), mask.numpy())


def test_certain_tokens_fall_back_to_ones_and_missing_reference_is_named() -> None:
    mask = torch.ones(2, 3)
    p = parse_weighting_params("token-reference", {"alpha": 1.0})
    w = token_weights("token-reference", p, 0, torch.ones(2, 3), mask, torch.zeros(2, 3))
    np.testing.assert_array_equal(w.numpy(), mask.numpy())
    with pytest.raises(ValueError, match="reference model's per-token loss"):
        token_weights("token-reference", p, 0, torch.ones(2, 3), mask, None)
    with pytest.raises(ValueError, match=r"must both be \[b, s\]"):
        token_weights("token-loss", parse_weighting_params("token-loss", {}), 0, torch.ones(6), torch.ones(6))


@pytest.mark.parametrize(
    "method,params,field",
    [
        ("token-reference", {"alpha": -0.5}, "alpha"),
        ("token-reference", {"alpha": 17}, "alpha"),
        ("token-reference", {"alpha": float("nan")}, "alpha"),
        ("token-reference", {"alpha": True}, "alpha"),
        ("token-loss", {"burn_in": -1}, "burn_in"),
        ("token-loss", {"burn_in": 1.5}, "burn_in"),
        ("token-loss", {"alpha": 1.0}, "alpha"),
    ],
)
def test_bad_params_name_the_field(method: str, params: dict, field: str) -> None:
    with pytest.raises(SpecError) as e:
        parse_weighting_params(method, params)
    assert f"weighting.params.{field}" in str(e.value)


def test_data_parallel_ranks_normalise_over_the_global_batch(tmp_path) -> None:
    import token_dist_worker

    args = (2, str(tmp_path / "init"), str(tmp_path))
    mp.start_processes(token_dist_worker.run, args=args, nprocs=2, join=True, start_method="fork")
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    for i, case in enumerate(CASES):
        np.testing.assert_allclose(
            np.concatenate([r[f"w{i}"] for r in ranks]), np.asarray(case["weights"]), rtol=1e-10, atol=1e-14
        )
        # Data parallelism averages the ranks' losses (and gradients): the global batch's loss.
        assert np.mean([float(r[f"loss{i}"]) for r in ranks]) == pytest.approx(case["loss"], rel=1e-10)
