"""Our strategies reproduce the authors' reference numbers (tests/conformance/*.json, or the folder
$MIXER_CONFORMANCE_DIR names; tests/conformance/README.md says how each file is fed).

Everything comes from the files: the scenarios (read at collection, one test case per scenario),
K, gradient widths, steps, hyperparameters and tolerances. A subset of scenarios is chosen by the
scenario's hyperparameters, never by its name. Each scenario runs from a fresh state; values pass
within the file's tolerance block. The pure update functions are fed directly, and where a strategy
variant implements the same update the strategy itself is driven too, one report per reference
step (the engine cadence is not involved).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from mixer.signals import Report, Window
from mixer.strategies import build_strategy
from mixer.strategies.aioli import aioli_weights, learn_params, normalize_interactions, probe_mixture
from mixer.strategies.dga import clip_gradient, doge_update
from mixer.strategies.odm import odm_step
from tests.conformance_dir import load_vectors, tolerance

# Files whose scenarios live in hyperparameters.scenarios, with one `expected` entry per scenario.
FILES = ("odm", "doremi", "aioli", "doge")


def scenarios(file: str, where: Callable[[dict[str, Any]], bool] | None = None) -> list[str]:
    """The file's scenario names, in file order (read when pytest collects this module);
    `where` keeps the scenarios whose hyperparameters it accepts."""
    hps = load_vectors(file)["hyperparameters"]["scenarios"]
    return [name for name, hp in hps.items() if where is None or where(hp)]


@pytest.mark.parametrize("file", FILES)
def test_every_scenario_of_the_file_is_covered(conformance, file):
    """hyperparameters, inputs and expected name the same scenarios, each with as many inputs as
    expected states, and the parametrised tests below run exactly those."""
    data = conformance(file)
    names = list(data["hyperparameters"]["scenarios"])
    assert names, f"{file}: no scenarios"
    assert len(names) == len(set(names))
    assert sorted(data["expected"]) == sorted(names)
    assert scenarios(file) == names
    by_input = data["inputs"].get("scenarios")
    for name, hp in data["hyperparameters"]["scenarios"].items():
        if by_input is not None:
            entries = by_input[name]
        elif "input_set" in hp:
            entries = data["inputs"][hp["input_set"]]
        else:
            entries = data["inputs"]["steps"]
        assert len(entries) == len(data["expected"][name]) > 0, f"{file} {name}"
    if by_input is not None:
        assert sorted(by_input) == sorted(names)


# --------------------------------------------------------------------------------------- ODM


def _odm_reward_scale(data: dict) -> float:
    """The EXP3 reward scaling the file states, e.g. 'reward/10 (hard-coded)' -> 0.1."""
    text = str(data["hyperparameters"]["common"]["reward_scaling_in_exp3"])
    m = re.search(r"reward\s*([/*])\s*(\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)", text)
    assert m, f"odm: cannot read the EXP3 reward scaling from {text!r}"
    return 1.0 / float(m[2]) if m[1] == "/" else float(m[2])


def _odm_rule(data: dict, hp: dict) -> tuple[dict, float, str | None]:
    """Keyword arguments of odm_step, reward scale and the strategy variant for a scenario."""
    if hp["method"] == "exp3":
        rule = {"alpha": None, "importance": True, "exp_reward": False, "policy": "exp"}
        return rule, _odm_reward_scale(data), "exp3"
    assert hp["method"] == "smoothed_mean", hp["method"]
    a = hp["smoothing_factor"]
    if hp["kind"] == "group":
        return {"alpha": a, "importance": False, "exp_reward": True, "policy": "linear"}, 1.0, "reference"
    assert hp["kind"] == "single", hp["kind"]
    return {"alpha": a, "importance": False, "exp_reward": True, "policy": "exp"}, 1.0, None


def _odm_has_strategy_variant(hp: dict) -> bool:
    """EXP3 (either kind) and the smoothed-mean group update are strategy variants; the
    smoothed-mean single-domain update exists only as odm_step."""
    return hp["method"] == "exp3" or hp["kind"] == "group"


def _odm_present(entry: dict) -> tuple[list[int], list[float]]:
    if "present_domains" in entry:
        return entry["present_domains"], entry["rewards"]
    return [entry["sampled_domain"]], [entry["reward"]]


@pytest.mark.parametrize("scenario", scenarios("odm"))
def test_odm_update_matches_reference(conformance, assert_close, scenario):
    data = conformance("odm")
    tol = tolerance(data)
    hp = data["hyperparameters"]["scenarios"][scenario]
    rule, scale, _ = _odm_rule(data, hp)
    K = data["hyperparameters"]["common"]["K"]
    init = np.asarray(hp["init_weights"], dtype=np.float64)
    assert init.shape == (K,), f"{scenario}: init_weights has {init.shape[0]} entries, K = {K}"
    R, pi, eps, prev_eps = np.zeros(K), init / init.sum(), 1.0 / K, None
    reward_key = "cumulative_estimated_reward" if hp["method"] == "exp3" else "estimated_reward"
    for entry, exp in zip(data["inputs"]["scenarios"][scenario], data["expected"][scenario], strict=True):
        it = entry["iteration"]
        where = f"{scenario} iteration {it}"
        applied = it > hp["warmup_steps"] and it % hp["update_frequency"] == 0
        assert applied == exp["update_applied"], where
        if applied:
            present, r = _odm_present(entry)
            prev_eps = eps
            R, pi, eps, raw = odm_step(R, pi, eps, it, present, np.asarray(r) * scale, **rule)
            assert_close(raw, exp["raw_weights"], **tol, what=f"{where} raw_weights")
        expected_p = np.asarray(exp["probabilities"]) / np.sum(exp["probabilities"])
        assert_close(pi, expected_p, **tol, what=f"{where} probabilities")
        assert_close(R, exp[reward_key], **tol, what=f"{where} {reward_key}")
        assert_close(eps, exp["eps"], **tol, what=f"{where} eps")
        if exp["prev_eps"] is not None:
            assert_close(prev_eps, exp["prev_eps"], **tol, what=f"{where} prev_eps")


@pytest.mark.parametrize("scenario", scenarios("odm", _odm_has_strategy_variant))
def test_odm_strategy_matches_reference(conformance, assert_close, make_spec, scenario):
    """The `exp3` and `reference` variants, one window per reference update (step = iteration - 1)."""
    data = conformance("odm")
    tol = tolerance(data)
    hp = data["hyperparameters"]["scenarios"][scenario]
    _, scale, variant = _odm_rule(data, hp)
    K = data["hyperparameters"]["common"]["K"]
    params = {"variant": variant, "reward_scale": scale}
    if hp["smoothing_factor"] is not None:
        params["alpha"] = hp["smoothing_factor"]
    domains = [{"name": f"d{i}", "weight": w} for i, w in enumerate(hp["init_weights"])]
    strategy = build_strategy(make_spec("odm", params, K=K, domains=domains))
    state = strategy.init(0)
    updates = 0
    for entry, exp in zip(data["inputs"]["scenarios"][scenario], data["expected"][scenario], strict=True):
        if not exp["update_applied"]:
            continue
        present, r = _odm_present(entry)
        loss_sum, tokens = np.zeros(K), np.zeros(K)
        loss_sum[present], tokens[present] = r, 1.0  # token-mean loss == the reference reward
        report = Report(
            step=entry["iteration"] - 1, source="w", domain_loss_sum=loss_sum, domain_token_count=tokens
        )
        state, decision = strategy.update(state, Window([report], K))
        updates += 1
        expected_p = np.asarray(exp["probabilities"]) / np.sum(exp["probabilities"])
        assert_close(decision.weights, expected_p, **tol, what=f"{scenario} it {entry['iteration']}")
    assert updates > 0, f"{scenario}: no update was applied, nothing compared"


# ------------------------------------------------------------------------------------ DoReMi


def _doremi_report(step: int, entry: dict, K: int) -> Report:
    """What a worker sends: per domain, the sum of per-token clipped excess (float32) and the token count."""
    excess = np.asarray(entry["proxy_pertoken_loss"], np.float32) - np.asarray(
        entry["reference_pertoken_loss"], np.float32
    )
    mask = np.asarray(entry["token_mask"]).astype(bool)
    clipped = np.where(mask, np.maximum(excess, np.float32(0)), np.float32(0)).astype(np.float64)
    ids = np.asarray(entry["domain_ids"])
    assert ids.min() >= 0 and ids.max() < K, f"domain id outside 0..{K - 1}"
    excess_sum = np.bincount(ids, weights=clipped.sum(axis=1), minlength=K)
    tokens = np.bincount(ids, weights=mask.sum(axis=1), minlength=K)
    return Report(step=step, source="w", excess_loss_sum=excess_sum, domain_token_count=tokens)


@pytest.mark.parametrize("scenario", scenarios("doremi"))
def test_doremi_matches_reference(conformance, assert_close, make_spec, scenario):
    data = conformance("doremi")
    tol, score_tol = tolerance(data), tolerance(data, "perdomain_scores")
    common = data["hyperparameters"]["common"]
    K = common["K"]
    hp = data["hyperparameters"]["scenarios"][scenario]
    # The reference's counter starts at initial_update_counter: 1 counts the initial weights in the
    # average, 0 would not.
    counter = common["initial_update_counter"]
    assert counter in (0, 1), f"initial_update_counter {counter!r}"
    params = {
        "eta": hp["reweight_eta"],
        "c": hp["reweight_eps"],
        "initial_score": math.log(common["vocab_size"]),
        "average_includes_initial": counter == 1,
    }
    strategy = build_strategy(make_spec("doremi", params, K=K))
    state = strategy.init(0)
    inputs = data["inputs"][hp["input_set"]]
    for t, (entry, exp) in enumerate(zip(inputs, data["expected"][scenario], strict=True)):
        state, decision = strategy.update(state, Window([_doremi_report(t, entry, K)], K))
        where = f"{scenario} step {t}"
        assert_close(
            decision.params["excess_loss"],
            exp["perdomain_scores"],
            **score_tol,
            what=f"{where} perdomain_scores",
        )
        # alpha (the reference's train_domain_weights), whether served (mode online) or applied
        # to the loss (mode paper, the default).
        assert_close(
            decision.params["alpha"], exp["train_domain_weights"], **tol, what=f"{where} train_domain_weights"
        )
        assert_close(
            decision.params["avg_weights"],
            exp["avg_domain_weights"],
            **tol,
            what=f"{where} avg_domain_weights",
        )
        assert state["avg_count"] == exp["update_counter"], where


# ------------------------------------------------------------------------------------- Aioli


def _aioli_prior(data: dict) -> np.ndarray:
    """The file's aioli_prior ('uniform [1]*K'), normalised."""
    common = data["hyperparameters"]["common"]
    assert str(common["aioli_prior"]).startswith("uniform"), common["aioli_prior"]
    return np.full(common["K"], 1.0 / common["K"])


@pytest.mark.parametrize("scenario", scenarios("aioli"))
def test_aioli_update_matches_reference(conformance, assert_close, scenario):
    data = conformance("aioli")
    tol = tolerance(data)
    K = data["hyperparameters"]["common"]["K"]
    hp = data["hyperparameters"]["scenarios"][scenario]
    prior = _aioli_prior(data)
    p, E = prior.copy(), None
    ohf = hp["one_hot_factor"]
    for rnd, exp in zip(data["inputs"]["scenarios"][scenario], data["expected"][scenario], strict=True):
        where = f"{scenario} round {rnd['round']}"
        order = rnd["lp_mixture_order"]
        assert len(order) == K * hp["lp_rounds"], where
        mixtures = [probe_mixture(K, j, ohf) for j in order]
        assert_close(mixtures, exp["lp_mixtures"], **tol, what=f"{where} lp_mixtures")
        A = learn_params(
            np.asarray(rnd["loss_0"]),
            np.asarray(order),
            np.asarray(rnd["lp_losses_after_each_segment"]),
            lp_rounds=hp["lp_rounds"],
            one_hot_factor=ohf,
            diagonal=hp["aioli_diagonal"],
        )
        assert_close(A, exp["A_estimate"], **tol, what=f"{where} A_estimate")
        if hp["aioli_normalize_A"]:
            A = normalize_interactions(A)
            assert_close(A, exp["A_after_normalization"], **tol, what=f"{where} A_after_normalization")
        p, E = aioli_weights(A, p, E, prior, eta=hp["eta"], ema=hp["ema"])
        if hp["ema"] is not None:
            assert_close(E, exp["ema_graph"], **tol, what=f"{where} ema_graph")
        assert_close(p, exp["proportions"], **tol, what=f"{where} proportions")


@pytest.mark.parametrize("scenario", scenarios("aioli"))
def test_aioli_strategy_matches_reference(conformance, assert_close, make_spec, scenario):
    """Drive the strategy's probe state machine with validation-loss reports; the recorded probe
    order replaces the strategy's own draw once each round has started."""
    data = conformance("aioli")
    tol = tolerance(data)
    K = data["hyperparameters"]["common"]["K"]
    hp = data["hyperparameters"]["scenarios"][scenario]
    params = {
        "eta": hp["eta"],
        "ema": hp["ema"],
        "lp_rounds": hp["lp_rounds"],
        "lp_steps": hp["lp_steps"],
        "one_hot_factor": hp["one_hot_factor"],
        "normalize": hp["aioli_normalize_A"],
        "diagonal": hp["aioli_diagonal"],
        "update_steps": hp["update_steps"],
    }
    strategy = build_strategy(make_spec("aioli", params, K=K))
    state = strategy.init(0)
    step = 0
    for rnd, exp in zip(data["inputs"]["scenarios"][scenario], data["expected"][scenario], strict=True):
        where = f"{scenario} round {rnd['round']}"
        step = max(step, state["next_round"])
        state, decision = strategy.update(
            state, Window([Report(step=step, source="w", val_loss=np.asarray(rnd["loss_0"]))], K)
        )
        assert decision is not None and decision.params["probing"], where
        state["order"] = np.asarray(rnd["lp_mixture_order"], dtype=np.int64)
        segments = rnd["lp_losses_after_each_segment"]
        for j, after in enumerate(segments):
            step = state["segment_start"] + hp["lp_steps"]  # evaluated after the segment's lp_steps steps
            state, decision = strategy.update(
                state, Window([Report(step=step, source="w", val_loss=np.asarray(after))], K)
            )
            if j + 1 < len(segments):
                assert decision.params["probing"], where
                assert_close(
                    decision.weights, exp["lp_mixtures"][j + 1], **tol, what=f"{where} lp_mixtures[{j + 1}]"
                )
        assert not decision.params["probing"], where
        assert_close(decision.weights, exp["proportions"], **tol, what=f"{where} proportions")


# -------------------------------------------------------------------------------------- DoGE


def _doge_absent(data: dict, name: str) -> set[tuple[int, int]]:
    """(step, domain) pairs listed under hyperparameters.absent_domains_in_<scenario>, if any."""
    return {tuple(x) for x in data["hyperparameters"].get(f"absent_domains_in_{name}", [])}


def _doge_inputs(data: dict, name: str) -> tuple[list[int], list[int], list[list[np.ndarray | None]]]:
    """Train ids, target ids and per-step gradients (None: absent) of a scenario. The train domains
    are the first K_train gradient rows; the target is the rows after them ('mix'), or the train
    domains themselves when the scenario does not use the mix target."""
    common = data["hyperparameters"]["common"]
    hp = data["hyperparameters"]["scenarios"][name]
    K, D = common["K_train"], common["gradient_dim"]
    absent = _doge_absent(data, name)
    steps = []
    for t, step in enumerate(data["inputs"]["steps"]):
        grads = [None if (t, d) in absent else np.asarray(g) for d, g in enumerate(step["domain_gradients"])]
        rows_needed = K + 1 if hp["tgt_is_mix"] else K
        assert len(grads) >= rows_needed, f"step {t}: {len(grads)} gradient rows, K_train = {K}"
        for d, g in enumerate(grads):
            assert g is None or g.shape == (D,), f"step {t} domain {d}: gradient shape {g.shape}, width {D}"
        steps.append(grads if hp["tgt_is_mix"] else grads[:K])
    train = list(range(K))
    target = list(range(K, len(steps[0]))) if hp["tgt_is_mix"] else train
    return train, target, steps


def test_doge_absent_domain_lists_name_scenarios(conformance):
    data = conformance("doge")
    names = set(data["hyperparameters"]["scenarios"])
    prefix = "absent_domains_in_"
    for key in data["hyperparameters"]:
        if key.startswith(prefix):
            assert key[len(prefix) :] in names, f"{key} names no scenario of doge.json"


@pytest.mark.parametrize("scenario", scenarios("doge"))
def test_doge_update_matches_reference(conformance, assert_close, scenario):
    data = conformance("doge")
    tol, grad_tol = tolerance(data), tolerance(data, "model_grad_after_reweighting")
    common = data["hyperparameters"]["common"]
    hp = data["hyperparameters"]["scenarios"][scenario]
    lr = data["inputs"]["lr_t"]
    train, target, steps = _doge_inputs(data, scenario)
    K = len(train)
    w, rows, total = np.full(K, 1.0 / K), np.zeros((len(steps[0]), common["gradient_dim"])), np.zeros(K)
    for t, (grads, exp) in enumerate(zip(steps, data["expected"][scenario], strict=True)):
        w, rows, model_grad = doge_update(
            w,
            rows,
            grads,
            train=train,
            target=target,
            lr=lr[t],
            mu=hp["mu"],
            max_grad_norm=hp["max_grad_norm"],
            dw_min=common["dw_min"],
            dw_max=common["dw_max"],
            eps=common["reweight_eps"],
        )
        total += w
        where = f"{scenario} step {t}"
        assert_close(w, exp["train_dw"], **tol, what=f"{where} train_dw")
        assert_close(total / (t + 1), exp["avg_dw"], **tol, what=f"{where} avg_dw")
        assert_close(
            np.linalg.norm(rows, axis=1), exp["clipped_grad_norms"], **tol, what=f"{where} clipped_grad_norms"
        )
        assert_close(model_grad, exp["model_grad_after_reweighting"], **grad_tol, what=f"{where} model_grad")


@pytest.mark.parametrize("scenario", scenarios("doge"))
def test_dga_strategy_reproduces_doge_from_scalar_alignments(conformance, assert_close, make_spec, scenario):
    """The worker sends W_i = <g_i, g_target>, the mean gradient norm and lr_t; dga with DoGE's mu
    (step lr_t / mu), no EMA and DoGE's clip range then gives DoGE's weights."""
    data = conformance("doge")
    tol = tolerance(data)
    common = data["hyperparameters"]["common"]
    hp = data["hyperparameters"]["scenarios"][scenario]
    lr = data["inputs"]["lr_t"]
    train, target, steps = _doge_inputs(data, scenario)
    K = len(train)
    params = {
        "mu": hp["mu"],
        "clip_min": common["dw_min"],
        "clip_max": common["dw_max"],
        "eps": common["reweight_eps"],
        "ema": 0.0,
        "exclude_self": False,
    }
    strategy = build_strategy(make_spec("dga", params, K=K))
    state = strategy.init(0)
    rows = np.zeros((len(steps[0]), common["gradient_dim"]))
    for t, (grads, exp) in enumerate(zip(steps, data["expected"][scenario], strict=True)):
        for i, g in enumerate(grads):
            if g is not None:
                rows[i] = clip_gradient(g, hp["max_grad_norm"])
        T = rows[train]
        alignment = T @ rows[target].sum(axis=0)
        extra = {"grad_norm_mean": float(np.linalg.norm(T, axis=1).mean()), "lr": lr[t]}
        report = Report(step=t, source="w", alignment=alignment, extra=extra)
        state, decision = strategy.update(state, Window([report], K))
        assert_close(decision.weights, exp["train_dw"], **tol, what=f"{scenario} step {t}")
        assert_close(decision.params["avg_weights"], exp["avg_dw"], **tol, what=f"{scenario} step {t} avg")
