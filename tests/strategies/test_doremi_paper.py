"""DoReMi in the paper's form: a fixed sampling mixture q, per-domain loss weights alpha / q.

The inputs are the stored DoReMi conformance inputs (per-token proxy and reference losses), fed
as workers send them; the expectations are a float64 re-derivation of Algorithm 1 written here.
"""

from __future__ import annotations

import numpy as np
import pytest

from mixer.engine import Engine
from mixer.shaping import shape_weights
from mixer.signals import Report, Window, validate_report
from mixer.spec import JobSpec, SpecError
from mixer.strategies import build_strategy

PRIOR = [1.0, 2.0, 3.0, 4.0, 6.0]  # a non-uniform q, so alpha / q differs from alpha


def _report(step: int, entry: dict, K: int) -> Report:
    """Per domain, the clipped excess summed over tokens (float32 per token, as the probe) and the tokens."""
    excess = np.asarray(entry["proxy_pertoken_loss"], np.float32) - np.asarray(
        entry["reference_pertoken_loss"], np.float32
    )
    mask = np.asarray(entry["token_mask"]).astype(bool)
    clipped = np.where(mask, np.maximum(excess, np.float32(0)), np.float32(0)).astype(np.float64)
    ids = np.asarray(entry["domain_ids"])
    return Report(
        step=step,
        source="w",
        excess_loss_sum=np.bincount(ids, weights=clipped.sum(axis=1), minlength=K),
        domain_token_count=np.bincount(ids, weights=mask.sum(axis=1), minlength=K).astype(np.float64),
    )


def _rederive(entries: list[dict], alpha0: np.ndarray, eta: float, c: float) -> list[np.ndarray]:
    """alpha_t of Algorithm 1 in float64: clip-then-mean excess per domain, exponentiated step, smoothing."""
    K = alpha0.shape[0]
    alpha, lam, out = alpha0.copy(), np.zeros(K), []
    for e in entries:
        excess = np.asarray(e["proxy_pertoken_loss"], np.float64) - np.asarray(
            e["reference_pertoken_loss"], np.float64
        )
        mask = np.asarray(e["token_mask"]).astype(bool)
        ids = np.asarray(e["domain_ids"])
        for i in range(K):
            sel = mask & (ids == i)[:, None]
            if sel.any():
                lam[i] = np.maximum(excess[sel], 0.0).mean()
        w = alpha * np.exp(eta * lam)
        alpha = (1 - c) * w / w.sum() + c / K
        out.append(alpha)
    return out


def _spec(params: dict | None = None, prior=PRIOR, **cadence) -> JobSpec:
    return JobSpec.from_dict(
        {
            "name": "dr",
            "domains": [{"name": f"d{i}", "weight": w} for i, w in enumerate(prior)],
            "strategy": {"name": "doremi", "params": params or {}},
            "cadence": {"update_every": 1, **cadence},
        }
    )


def test_paper_is_the_default_mode() -> None:
    assert build_strategy(_spec()).params["mode"] == "paper"


@pytest.mark.parametrize("cadence", [{}, {"min_weight": 0.15, "prior_smoothing": 0.2}])
def test_loss_weights_are_alpha_over_q_and_sampling_never_moves(conformance, cadence) -> None:
    data = conformance("doremi")
    hp = data["hyperparameters"]["scenarios"]["paper_run_script_eta1_eps1e-3"]
    entries = data["inputs"][hp["input_set"]]
    spec = _spec({"eta": hp["reweight_eta"], "c": hp["reweight_eps"]}, **cadence)
    K = spec.num_domains
    prior = np.asarray(PRIOR) / sum(PRIOR)
    q = shape_weights(prior, prior, spec.cadence)  # what workers sample from
    engine = Engine(spec)
    v0 = engine.current
    np.testing.assert_array_equal(v0.weights, q)
    versions = []
    for t, e in enumerate(entries):
        v = engine.ingest(validate_report(_report(t, e, K), K), t)
        assert v is not None, f"no version for the report of step {t}: cadence every step must update"
        versions.append(v)
    expected = _rederive(entries, prior, hp["reweight_eta"], hp["reweight_eps"])
    for t, (v, alpha) in enumerate(zip(versions, expected)):
        np.testing.assert_array_equal(v.weights, q, err_msg=f"step {t}: sampling weights moved")
        np.testing.assert_allclose(v.params["alpha"], alpha, rtol=1e-6, atol=1e-12, err_msg=f"step {t}")
        np.testing.assert_allclose(
            v.params["domain_loss_weights"], alpha / q, rtol=1e-6, atol=1e-12, err_msg=f"step {t}"
        )
        avg = np.mean(expected[: t + 1], axis=0)
        np.testing.assert_allclose(v.params["avg_weights"], avg, rtol=1e-6, atol=1e-12, err_msg=f"step {t}")
    # The re-derived alpha moves away from q: the loss weights really do something.
    assert np.abs(np.asarray(versions[-1].params["domain_loss_weights"]) - 1.0).max() > 0.05


def test_online_mode_serves_alpha(conformance) -> None:
    data = conformance("doremi")
    entries = data["inputs"]["main"]
    spec = _spec({"mode": "online"})
    strategy = build_strategy(spec)
    state = strategy.init(0)
    for t, e in enumerate(entries):
        state, decision = strategy.update(state, Window([_report(t, e, spec.num_domains)], spec.num_domains))
        np.testing.assert_array_equal(decision.weights, decision.params["alpha"])
        assert "domain_loss_weights" not in decision.params


def test_a_never_sampled_domain_gets_loss_weight_zero() -> None:
    spec = _spec(prior=[1.0, 0.0, 1.0])
    strategy = build_strategy(spec)
    report = Report(
        step=0,
        source="w",
        excess_loss_sum=np.array([3.0, 0.0, 1.0]),
        domain_token_count=np.array([10.0, 0.0, 10.0]),
    )
    _, decision = strategy.update(strategy.init(0), Window([report], 3))
    c = decision.params["domain_loss_weights"]
    assert c[1] == 0.0 and all(np.isfinite(c)) and c[0] > c[2] > 0


@pytest.mark.parametrize(
    ("params", "prior", "field"),
    [
        ({"mode": "proxy"}, PRIOR, "strategy.params.mode"),
        ({"output": "average"}, PRIOR, "strategy.params.output"),
        ({}, [1.0, 1e-9, 1.0], "domains[1].weight"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(params, prior, field) -> None:
    with pytest.raises(SpecError) as e:
        build_strategy(_spec(params, prior=prior))
    assert e.value.field == field
