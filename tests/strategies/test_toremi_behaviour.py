"""ToReMi end to end through the engine, the wire, the sampler and the instance weighting.

The preference is applied once: a topic-weight spread of w_max / w_min gives that spread of
gradient share, not its square (the domain-sampling variant, ours and off by default, compounds
it). Samples may carry several topics; the stage switch follows the reference's evaluation rule.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from mixer.engine import Engine
from mixer.megatron.instance import InstanceWeighting
from mixer.megatron.sampler import MixtureSampler
from mixer.megatron.versions import VersionUpdate
from mixer.signals import Report, SignalError, Window, validate_report
from mixer.spec import JobSpec, SpecError
from mixer.strategies import build_strategy
from mixer.wire import report_from_proto, report_to_proto
from tests.conformance_dir import load_vectors

W_MIN, W_MAX = 0.1, 5.0


def _spec(params: dict, *, K: int = 2, batch_weights: list[float] | None = None) -> JobSpec:
    return JobSpec.from_dict(
        {
            "name": "toremi",
            "domains": [{"name": f"d{i}", "weight": w} for i, w in enumerate(batch_weights or [1.0] * K)],
            "strategy": {"name": "toremi", "params": params},
            "weighting": {"name": "topic"},
            "cadence": {"update_every": 1, "delay": 0},
        }
    )


def _train_report(step: int, losses: list[float], topics, domains: list[int]) -> Report:
    return Report(
        step=step,
        source="rank0",
        sample_loss=np.asarray(losses, np.float32),
        sample_topic=np.asarray(topics, np.int32),
        sample_domain=np.asarray(domains, np.int32),
    )


def _drive_to_the_bounds(engine: Engine) -> object:
    """Topic d (= domain d): topic 0 easy, topic 1 at twice the mean; in stage 1 until both sit at a bound."""
    version = None
    for step in range(50):
        for seq, r in enumerate(
            (
                Report(step=step, source="eval", val_loss=np.ones(2)),
                _train_report(step, [1.0, 1.0, 3.0, 3.0], [0, 0, 1, 1], [0, 0, 1, 1]),
            )
        ):
            version = engine.ingest(validate_report(r, 2), 2 * step + seq) or version
        tw = version.params["topic_weights"] if version is not None else None
        if tw == [W_MAX, W_MIN]:
            return version
    raise AssertionError(f"topic weights never reached the bounds: {tw}")


def _gradient_share(version, spec: JobSpec, batch: int) -> float:
    """Domain 0's gradient over domain 1's for a model whose per-sample loss is theta[domain]."""
    sampler = MixtureSampler(2, batch, version.weights, fingerprint="t")
    domains = torch.tensor([d for d, _ in sampler.next_global_batch(0)])
    weighting = InstanceWeighting(spec)
    weighting.offer(VersionUpdate.of(version))
    weighting.sync(version.version)
    w = weighting.weights(0, torch.zeros(batch), domains, topics=domains)
    theta = torch.zeros(2, requires_grad=True)
    (w * theta[domains]).mean().backward()
    return float(theta.grad[0] / theta.grad[1])


@pytest.mark.parametrize("variant", [False, True])
def test_a_topic_preference_is_applied_once(variant):
    spec = _spec({"switch_step": 0, "w_min": W_MIN, "w_max": W_MAX, "domain_sampling": variant})
    version = _drive_to_the_bounds(Engine(spec))
    spread = W_MAX / W_MIN
    share = _gradient_share(version, spec, batch=510)
    if variant:
        # Ours, opt-in: sampling and loss weights both carry the preference.
        assert share == pytest.approx(spread**2, rel=0.05)
    else:
        np.testing.assert_allclose(version.weights, np.asarray(spec.prior()), rtol=0, atol=0)
        assert share == pytest.approx(spread, rel=1e-5)


def test_the_stage_switches_at_an_evaluation_after_switch_step_with_an_earlier_one(make_spec):
    strategy = build_strategy(make_spec("toremi", {"switch_step": 10, "num_topics": 2}, K=1))
    state = strategy.init(0)
    train = validate_report(
        Report(
            step=0, source="a", sample_loss=np.array([1.0, 3.0], np.float32), sample_topic=np.array([0, 1])
        ),
        1,
    )

    def evaluation(step):
        return validate_report(Report(step=step, source="eval", val_loss=np.ones(1)), 1)

    # A process's first evaluation only records the loss, even after the switch step (as on resume).
    state, _ = strategy.update(state, Window([train, evaluation(20)], 1))
    assert state["stage"] == 0
    state, _ = strategy.update(state, Window([train], 1))
    assert state["stage"] == 0, "no evaluation, no switch"
    state, _ = strategy.update(state, Window([train, evaluation(21)], 1))
    assert state["stage"] == 1
    fresh = strategy.init(0)
    fresh, _ = strategy.update(fresh, Window([evaluation(5), train, evaluation(10)], 1))
    assert fresh["stage"] == 0, "the switch needs a step strictly after switch_step"


def test_the_default_switch_is_the_reference_fraction_of_the_planned_run(make_spec):
    data = load_vectors("toremi")["hyperparameters"]["common"]
    switch = int(re.search(r"completed_steps\s*>\s*(\d+)", data["stage_switch"]).group(1))
    planned = data["pretrain_sh_defaults"]["max_train_steps"]
    for total in (planned, 3 * planned + 7, 100):
        strategy = build_strategy(make_spec("toremi", {"total_steps": total}, K=1))
        assert strategy.switch_at == int(total * switch / planned)
    with pytest.raises(SpecError, match="total_steps"):
        make_spec("toremi", {}, K=1)
    with pytest.raises(SpecError, match="switch_fraction"):
        make_spec("toremi", {"total_steps": 10, "switch_fraction": 0.0}, K=1)


def test_several_topics_per_sample_travel_the_wire_and_count_in_each_topic(make_spec):
    rows = np.array([[0, 2, -1], [1, -1, -1], [-1, -1, -1], [2, 1, 0]], np.int32)
    losses = np.array([2.0, 4.0, 9.0, 3.0], np.float32)
    sent = validate_report(Report(step=3, source="a", sample_loss=losses, sample_topic=rows), 1)
    got = validate_report(report_from_proto(report_to_proto(sent)), 1)
    np.testing.assert_array_equal(got.sample_topic, rows)
    one = validate_report(
        Report(step=3, source="a", sample_loss=losses, sample_topic=np.array([0, 1, 2, 0])), 1
    )
    assert report_from_proto(report_to_proto(one)).sample_topic.ndim == 1

    strategy = build_strategy(make_spec("toremi", {"switch_step": 100, "num_topics": 3}, K=1))
    _, decision = strategy.update(strategy.init(0), Window([got], 1))
    # Each labelled sample's loss counts fully in each of its topics; the unlabelled one nowhere.
    want = np.array([(2.0 + 3.0) / 2, (4.0 + 3.0) / 2, (2.0 + 3.0) / 2])
    G = want.mean()
    expected = np.where(want > G, np.minimum(1.0 + (want - G) / G, 5.0), 1.0)
    np.testing.assert_allclose(decision.params["topic_weights"], expected, rtol=1e-12)


@pytest.mark.parametrize(
    ("topics", "match"),
    [
        (np.array([[0, -2]]), "sample_topic"),
        (np.array([-1]), "sample_topic"),
        (np.array([1 << 16]), "sample_topic"),
        (np.zeros((1, 65), np.int32), "topics per sample"),
        (np.zeros((1, 2, 2), np.int32), "one-dimensional"),
    ],
)
def test_bad_topic_rows_are_refused_by_name(topics, match):
    with pytest.raises(SignalError, match=match):
        validate_report(
            Report(step=0, source="a", sample_loss=np.ones(len(topics), np.float32), sample_topic=topics), 1
        )


def test_a_ragged_topic_width_on_the_wire_is_refused():
    msg = report_to_proto(
        Report(
            step=0, source="a", sample_loss=np.ones(2, np.float32), sample_topic=np.array([[0, 1], [1, -1]])
        )
    )
    msg.sample_topic_width = 3
    with pytest.raises(SignalError, match="rows of 3"):
        report_from_proto(msg)
