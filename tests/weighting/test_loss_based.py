"""Loss-based weights: torch against the float64 reference, detachment, sums, errors, burn-in, DP."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from mixer.spec import SpecError
from mixer.weighting.loss_based import loss_weights, loss_weights_np, reweighted_loss, weights_for_step
from mixer.weighting.params import LOSS_METHODS, LossParams
from tests.conformance_dir import load_vectors

losses_st = st.lists(st.floats(0.0, 20.0, allow_nan=False, width=32), min_size=1, max_size=300)


@settings(max_examples=60, deadline=None)
@given(
    losses=losses_st,
    method=st.sampled_from(LOSS_METHODS),
    delta=st.sampled_from([0.5, 1.0, 2.0]),
    r=st.sampled_from([0.2, 0.4, 1.0, 3.0]),
)
def test_torch_float32_equals_float64_reference(
    losses: list[float], method: str, delta: float, r: float
) -> None:
    x = torch.tensor(losses, dtype=torch.float32)
    got = loss_weights(x, method, delta, r)
    # The reference sees the same float32 inputs, so only arithmetic rounding separates them.
    want = loss_weights_np(x.double().numpy(), method, delta, r)
    assert got.dtype == torch.float32
    # float32 h carries ~1e-7/range relative error; exp(f/r) amplifies it by ~|f'|/r <= 2 delta/r.
    lo, hi = min(losses), max(losses)
    rtol = 1e-5 + 4e-7 * (max(hi, 1.0) / max(hi - lo, 1e-6)) * 2 * delta / r
    np.testing.assert_allclose(got.double().numpy(), want, rtol=min(rtol, 1e-2), atol=1e-6)
    assert got.sum().item() == pytest.approx(len(losses), rel=1e-5)


@pytest.mark.parametrize("method", LOSS_METHODS + ("mid",))
def test_weights_are_detached_and_sum_to_batch_size(method: str) -> None:
    x = (torch.rand(64, dtype=torch.float32) * 5).requires_grad_()
    w = loss_weights(x, method, 1.0, 0.5)
    assert not w.requires_grad and w.grad_fn is None
    assert w.sum().item() == pytest.approx(64, rel=1e-6)
    assert (w > 0).all()
    # The loss keeps its graph through the losses only.
    loss = reweighted_loss(x, torch.full((64,), 100), w)
    loss.backward()
    np.testing.assert_allclose(x.grad.numpy(), (w / 64).numpy(), rtol=1e-6)


def test_strategies_weight_the_ends_as_the_paper_says() -> None:
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    lin = loss_weights(x, "linupper")
    assert lin[0] < lin[1] < lin[2] and torch.allclose(lin[2:], lin[2].expand(3))
    quad = loss_weights(x, "quadratic")
    assert quad.argmax() == 2 and torch.isclose(quad[0], quad[4])
    ext = loss_weights(x, "extremes")
    assert ext.argmin() == 2 and torch.isclose(ext[0], ext[4])
    assert torch.equal(loss_weights(x, "uniform"), torch.ones(5))
    # Smaller r sharpens: the min/max ratio of LinUpper falls from e^-1 at r = 1 to e^-2.5 at r = 0.4.
    assert (lin[0] / lin[4]).item() == pytest.approx(math.exp(-1), rel=1e-5)
    assert (
        loss_weights(x, "linupper", r=0.4)[0] / loss_weights(x, "linupper", r=0.4)[4]
    ).item() == pytest.approx(math.exp(-2.5), rel=1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_losses_raise_a_clear_error(bad: float) -> None:
    x = torch.tensor([1.0, 2.0, bad, 3.0])
    with pytest.raises(ValueError, match=r"non-finite value .* at global sample index 2"):
        loss_weights(x)
    with pytest.raises(ValueError, match="non-finite"):
        loss_weights_np(x.numpy())
    # During burn-in too: a NaN must never pass silently.
    with pytest.raises(ValueError, match="non-finite"):
        weights_for_step(0, x, {})


def test_bad_shapes_and_arguments_raise() -> None:
    with pytest.raises(ValueError, match="empty"):
        loss_weights(torch.tensor([]))
    with pytest.raises(ValueError, match="1-D"):
        loss_weights(torch.ones(2, 2))
    with pytest.raises(ValueError, match="unknown loss-reweighting method"):
        loss_weights(torch.ones(3), "nope")
    with pytest.raises(ValueError, match="temperature"):
        loss_weights(torch.ones(3), r=0.0)


def test_burn_in_gives_uniform_then_reweights() -> None:
    x = torch.tensor([1.0, 2.0, 6.0], dtype=torch.float64, requires_grad=True)
    params = {"method": "extremes", "r": 0.5, "burn_in": 10}
    for step in (0, 9):
        w = weights_for_step(step, x, params)
        assert torch.equal(w, torch.ones(3, dtype=torch.float64)) and not w.requires_grad
    w = weights_for_step(10, x, LossParams.parse(params))
    np.testing.assert_allclose(w.numpy(), loss_weights_np([1.0, 2.0, 6.0], "extremes", 1.0, 0.5), rtol=1e-12)
    assert weights_for_step(999, torch.ones(4), {}).tolist() == [1.0] * 4  # default burn-in 1,000
    assert not torch.equal(weights_for_step(1000, torch.arange(4.0), {}), torch.ones(4))


def test_half_precision_losses_get_float32_weights() -> None:
    x = torch.tensor([1.0, 2.0, 3.5], dtype=torch.bfloat16)
    w = loss_weights(x, "quadratic")
    assert w.dtype == torch.float32
    np.testing.assert_allclose(w.numpy(), loss_weights_np(x.float().numpy(), "quadratic"), rtol=1e-6)


def test_params_schema() -> None:
    # Defaults: the authors' released LinUpper configuration (read from the reference vectors).
    defaults = load_vectors("sow_loss_reweighting")["hyperparameters"]["defaults"]
    (released_r,) = {c["kl_reg"] for c in defaults["released configs"].values() if c["strategy"] == "linupper"}
    assert LossParams.parse({}) == LossParams(
        method="linupper", delta=1.0, r=released_r, burn_in=defaults["burnout_steps"]
    )
    assert LossParams.parse({"method": "mid"}).method == "quadratic"
    assert LossParams.parse({"method": "extremes", "r": 0.4}).to_dict() == {
        "method": "extremes",
        "delta": 1.0,
        "r": 0.4,
        "burn_in": 1000,
    }
    for bad, field in [
        ({"r": 0}, "r"),
        ({"delta": -1}, "delta"),
        ({"burn_in": 1.5}, "burn_in"),
        ({"method": "x"}, "method"),
        ({"rr": 1}, "rr"),
    ]:
        with pytest.raises(SpecError) as e:
            LossParams.parse(bad)
        assert e.value.field == f"weighting.params.{field}"


@pytest.mark.gpu
def test_cuda_weights_equal_the_reference() -> None:
    x = torch.rand(4096, device="cuda", requires_grad=True) * 8
    w = loss_weights(x, "linupper", 1.0, 0.4)
    assert w.device.type == "cuda" and not w.requires_grad
    np.testing.assert_allclose(
        w.cpu().double().numpy(),
        loss_weights_np(x.detach().cpu().double().numpy(), "linupper", 1.0, 0.4),
        rtol=1e-4,
    )


def test_distributed_weighting_matches_the_global_batch(tmp_path) -> None:
    import dist_worker

    from mixer.weighting import dwm, topic

    # fork, not spawn: a spawned child re-imports torch, which costs seconds on a loaded machine.
    args = (2, str(tmp_path / "init"), str(tmp_path))
    mp.start_processes(dist_worker.run, args=args, nprocs=2, join=True, start_method="fork")
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    b = dist_worker.batch()
    want_loss = loss_weights_np(b["losses"], "linupper", 1.0, 0.4)
    np.testing.assert_allclose(np.concatenate([r["loss"] for r in ranks]), want_loss, rtol=1e-12)
    want_topic = topic.sample_weights_np(b["topics"], dist_worker.TOPIC_WEIGHTS)
    np.testing.assert_allclose(np.concatenate([r["topic"] for r in ranks]), want_topic, rtol=1e-6)
    params = dwm.init_params(6, 8, seed=3)
    params["w2"] = np.linspace(-1, 1, 8, dtype=np.float32)
    want_dwm = dwm.evaluate(params, torch.tensor(b["features"], dtype=torch.float32)).numpy()
    np.testing.assert_allclose(np.concatenate([r["dwm"] for r in ranks]), want_dwm, rtol=1e-5)
    # A NaN on one rank makes every rank raise, so none is left waiting in a collective.
    assert all(bool(r["nan_raised"]) and bool(r["dwm_nan_raised"]) for r in ranks)
