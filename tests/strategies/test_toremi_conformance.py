"""ToReMi against the authors' code (tests/conformance/toremi.json): every scenario in the file.

Each micro-batch becomes a report at its step (the optimizer steps completed before it), each
evaluation a report carrying `val_loss` at the completed step, and every adjustment an update over
the reports since the previous one, as the engine's windows do. The per-sample weights in effect
at the recorded micro-batches come from mixer.weighting.topic with the strategy's topic weights.
Scenarios, topic counts, cadences and tolerances all come from the file.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from mixer.signals import Report, Window, validate_report
from mixer.strategies import build_strategy
from mixer.strategies.toremi import accumulate
from mixer.weighting.topic import sample_weights
from tests.conformance_dir import load_vectors

DATA = load_vectors("toremi")
SCENARIOS = sorted(DATA["inputs"]["scenarios"])


def _rows(topics: list[list[int]]) -> np.ndarray:
    """Label lists as rows padded with -1 (at least one column)."""
    width = max(1, *(len(t) for t in topics))
    out = np.full((len(topics), width), -1, dtype=np.int32)
    for i, t in enumerate(topics):
        out[i, : len(t)] = t
    return out


def _hyper(name: str) -> dict[str, Any]:
    h = DATA["hyperparameters"]
    return {**h["common"], **h["scenarios"][name]}


def _run(name: str, make_spec) -> dict[str, Any]:
    """Feed one scenario as the reference's loop does; what our strategy and weighting produced."""
    hp = _hyper(name)
    inputs = DATA["inputs"]["scenarios"][name]
    ga, every_eval, every_adjust = (
        hp["gradient_accumulation_steps"],
        hp["steps_to_eval"],
        hp["steps_to_adjust_weight"],
    )
    K_topics = hp["K_topics"]
    # The reference switches after a hard-coded step of its planned run; the file states it in words.
    switch = _reference_switch_step(hp["stage_switch"])
    strategy = build_strategy(
        make_spec(
            "toremi",
            {
                "switch_step": switch,
                "num_topics": K_topics,
                "w_min": hp["MIN_WEIGHT"],
                "w_max": hp["MAX_WEIGHT"],
            },
            K=1,
        )
    )
    state = strategy.init(0)
    completed = hp["resume_from_completed_steps"] or 0
    evals = iter(inputs["eval_valid_losses"])
    pending: list[Report] = []
    out: dict[str, Any] = {"adjustments": [], "batches": {}, "evaluations": []}
    for index, mb in enumerate(inputs["micro_batches"]):
        rows = _rows(mb["topics"])
        tw = torch.tensor(state["topic_weights"], dtype=torch.float64)
        s = sample_weights(torch.tensor(rows), tw, normalize=False).float()
        losses = torch.tensor(mb["losses"], dtype=torch.float32)
        out["batches"][index] = {
            "topic_weights": state["topic_weights"].tolist(),
            "sample_weights": s.numpy(),
            "adjusted_loss": float((losses * s).mean() / ga),
        }
        report = Report(
            step=mb["completed_steps_before"],
            source="rank0",
            seq=index,
            sample_loss=np.asarray(mb["losses"], dtype=np.float32),
            sample_topic=rows,
        )
        pending.append(validate_report(report, 1))
        if mb["loop_step"] % ga:
            continue
        completed += 1
        if completed % every_eval == 0:
            pending.append(
                validate_report(Report(step=completed, source="eval", val_loss=np.array([next(evals)])), 1)
            )
        if completed % every_adjust == 0:
            before = state["topic_weights"].copy()
            state, decision = strategy.update(state, Window(pending, 1))
            pending = []
            out["adjustments"].append(
                {
                    "completed_steps": completed,
                    "training_stage": state["stage"],
                    "weights_before": before.tolist(),
                    "weights_after": state["topic_weights"].tolist(),
                    "shipped": None if decision is None else decision.params["topic_weights"],
                    "domain_weights": None if decision is None else decision.weights.tolist(),
                }
            )
    out["final_topic_weights"] = state["topic_weights"].tolist()
    out["final_training_stage"] = state["stage"]
    return out


def _reference_switch_step(text: str) -> int:
    """The step in "... completed_steps > 7000 ..." of the file's stage_switch note."""
    import re

    m = re.search(r"completed_steps\s*>\s*(\d+)", text)
    assert m, f"no switch step in {text!r}"
    return int(m.group(1))


@pytest.mark.parametrize("name", SCENARIOS)
def test_topic_weights_match_the_reference(name, make_spec, assert_close):
    tol = DATA["tolerance"]
    rtol, atol = float(tol["rtol"]), float(tol["atol"])
    got = _run(name, make_spec)
    want = DATA["expected"][name]
    assert len(got["adjustments"]) == len(want["adjustments"]), "number of adjustments"
    for g, e in zip(got["adjustments"], want["adjustments"], strict=True):
        where = f"{name} adjustment at step {e['completed_steps']}"
        assert g["completed_steps"] == e["completed_steps"], where
        assert g["training_stage"] == e["training_stage"], f"{where}: stage"
        assert_close(
            g["weights_before"], e["weights_before"], rtol=rtol, atol=atol, what=f"{where}: weights_before"
        )
        assert_close(
            g["weights_after"], e["weights_after"], rtol=rtol, atol=atol, what=f"{where}: weights_after"
        )
        if e["accumulators_reset"]:
            assert g["shipped"] == g["weights_after"], f"{where}: the version carries the new topic weights"
            # The preference is applied once, in the loss: the domain weights stay the prior.
            assert g["domain_weights"] == [1.0], f"{where}: domain weights moved"
    assert_close(
        got["final_topic_weights"], want["final_topic_weights"], rtol=rtol, atol=atol, what="final weights"
    )
    assert got["final_training_stage"] == want["final_training_stage"]


@pytest.mark.parametrize("name", SCENARIOS)
def test_sample_weights_and_loss_match_the_reference(name, make_spec, assert_close):
    f32 = float(DATA["tolerance"]["float32_fields_rtol"])
    got = _run(name, make_spec)
    want = DATA["expected"][name]["sample_weight_batches"]
    assert want, "the file records micro-batches"
    for e in want:
        g = got["batches"][e["micro_index"]]
        where = f"{name} micro-batch {e['micro_index']}"
        assert_close(
            g["topic_weights"],
            e["topic_weights_in_effect"],
            rtol=1e-12,
            atol=0,
            what=f"{where}: weights in effect",
        )
        np.testing.assert_array_equal(
            g["sample_weights"], np.asarray(e["sample_weights"], np.float32), err_msg=where
        )
        assert_close(g["adjusted_loss"], e["adjusted_loss"], rtol=f32, atol=0, what=f"{where}: adjusted_loss")


def test_period_sums_count_a_multi_label_sample_in_every_topic(assert_close):
    """The file's token-level batch: a multi-label sample's loss counts fully in each of its topics;
    an unlabelled sample counts nowhere and gets weight 0."""
    block = DATA["per_sample_loss_from_tokens"]
    rows = _rows(block["inputs"]["topics"])
    losses = np.asarray(block["expected"]["loss_per_sample"], dtype=np.float32)
    K_topics = len(block["expected"]["period_count_after"])
    w, sums, counts = accumulate(
        np.ones(K_topics), np.zeros(K_topics), np.zeros(K_topics, np.int64), losses, rows
    )
    assert counts.tolist() == block["expected"]["period_count_after"]
    assert_close(sums, block["expected"]["period_loss_sum_after"], rtol=1e-12, atol=0, what="period sums")
    assert w.tolist() == [1.0] * K_topics
    s = sample_weights(torch.tensor(rows), torch.ones(K_topics, dtype=torch.float64), normalize=False).float()
    np.testing.assert_array_equal(s.numpy(), np.asarray(block["expected"]["sample_weights"], np.float32))
