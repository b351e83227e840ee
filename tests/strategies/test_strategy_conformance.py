"""Our strategies reproduce the authors' reference numbers (tests/conformance/*.json).

Each scenario runs from a fresh state; values pass within the file's tolerance block. The pure
update functions are fed directly, and where a strategy variant implements the same update the
strategy itself is driven too, one report per reference step (the engine cadence is not involved).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from mixer.signals import Report, Window
from mixer.strategies import build_strategy
from mixer.strategies.aioli import aioli_weights, learn_params, normalize_interactions, probe_mixture
from mixer.strategies.dga import clip_gradient, doge_update
from mixer.strategies.odm import odm_step

# --------------------------------------------------------------------------------------- ODM

ODM_SCENARIOS = [
    "exp3_single_domain_per_step",
    "exp3_single_warmup10_freq3",
    "exp3_mixed_minibatch_group_update",
    "smoothed_mean_mixed_minibatch_group_update_a0.9",
    "smoothed_mean_mixed_minibatch_group_update_a0.5",
    "smoothed_mean_single_domain_per_step_a0.9",
]


def _odm_rule(hp: dict) -> tuple[dict, float, str | None]:
    """Keyword arguments of odm_step, reward scale and the strategy variant for a scenario."""
    if hp["method"] == "exp3":
        return {"alpha": None, "importance": True, "exp_reward": False, "policy": "exp"}, 0.1, "exp3"
    a = hp["smoothing_factor"]
    if hp["kind"] == "group":
        return {"alpha": a, "importance": False, "exp_reward": True, "policy": "linear"}, 1.0, "reference"
    return {"alpha": a, "importance": False, "exp_reward": True, "policy": "exp"}, 1.0, None


def _odm_present(entry: dict) -> tuple[list[int], list[float]]:
    if "present_domains" in entry:
        return entry["present_domains"], entry["rewards"]
    return [entry["sampled_domain"]], [entry["reward"]]


def test_odm_scenario_list_is_complete(conformance):
    assert sorted(conformance("odm")["expected"]) == sorted(ODM_SCENARIOS)


@pytest.mark.parametrize("scenario", ODM_SCENARIOS)
def test_odm_update_matches_reference(conformance, assert_close, scenario):
    data = conformance("odm")
    tol = data["tolerance"]
    hp = data["hyperparameters"]["scenarios"][scenario]
    rule, scale, _ = _odm_rule(hp)
    K = data["hyperparameters"]["common"]["K"]
    init = np.asarray(hp["init_weights"], dtype=np.float64)
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
            assert_close(
                raw, exp["raw_weights"], rtol=tol["rtol"], atol=tol["atol"], what=f"{where} raw_weights"
            )
        expected_p = np.asarray(exp["probabilities"]) / np.sum(exp["probabilities"])
        assert_close(pi, expected_p, rtol=tol["rtol"], atol=tol["atol"], what=f"{where} probabilities")
        assert_close(R, exp[reward_key], rtol=tol["rtol"], atol=tol["atol"], what=f"{where} {reward_key}")
        assert_close(eps, exp["eps"], rtol=tol["rtol"], atol=tol["atol"], what=f"{where} eps")
        if exp["prev_eps"] is not None:
            assert_close(
                prev_eps, exp["prev_eps"], rtol=tol["rtol"], atol=tol["atol"], what=f"{where} prev_eps"
            )


@pytest.mark.parametrize("scenario", [s for s in ODM_SCENARIOS if not s.startswith("smoothed_mean_single")])
def test_odm_strategy_matches_reference(conformance, assert_close, make_spec, scenario):
    """The `exp3` and `reference` variants, one window per reference update (step = iteration - 1)."""
    data = conformance("odm")
    tol = data["tolerance"]
    hp = data["hyperparameters"]["scenarios"][scenario]
    _, scale, variant = _odm_rule(hp)
    K = data["hyperparameters"]["common"]["K"]
    params = {"variant": variant, "reward_scale": scale}
    if hp["smoothing_factor"] is not None:
        params["alpha"] = hp["smoothing_factor"]
    domains = [{"name": f"d{i}", "weight": w} for i, w in enumerate(hp["init_weights"])]
    strategy = build_strategy(make_spec("odm", params, K=K, domains=domains))
    state = strategy.init(0)
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
        expected_p = np.asarray(exp["probabilities"]) / np.sum(exp["probabilities"])
        assert_close(
            decision.weights,
            expected_p,
            rtol=tol["rtol"],
            atol=tol["atol"],
            what=f"{scenario} it {entry['iteration']}",
        )


# ------------------------------------------------------------------------------------ DoReMi


def _doremi_report(step: int, entry: dict, K: int) -> Report:
    """What a worker sends: per domain, the sum of per-token clipped excess (float32) and the token count."""
    excess = np.asarray(entry["proxy_pertoken_loss"], np.float32) - np.asarray(
        entry["reference_pertoken_loss"], np.float32
    )
    mask = np.asarray(entry["token_mask"]).astype(bool)
    clipped = np.where(mask, np.maximum(excess, np.float32(0)), np.float32(0)).astype(np.float64)
    ids = np.asarray(entry["domain_ids"])
    excess_sum = np.bincount(ids, weights=clipped.sum(axis=1), minlength=K)
    tokens = np.bincount(ids, weights=mask.sum(axis=1), minlength=K)
    return Report(step=step, source="w", excess_loss_sum=excess_sum, domain_token_count=tokens)


def test_doremi_matches_reference(conformance, assert_close, make_spec):
    data = conformance("doremi")
    tol = data["tolerance"]
    common = data["hyperparameters"]["common"]
    K = common["K"]
    scenarios = data["hyperparameters"]["scenarios"]
    assert sorted(scenarios) == sorted(data["expected"])
    for name, hp in scenarios.items():
        params = {
            "eta": hp["reweight_eta"],
            "c": hp["reweight_eps"],
            "initial_score": math.log(common["vocab_size"]),
            "average_includes_initial": True,
        }
        strategy = build_strategy(make_spec("doremi", params, K=K))
        state = strategy.init(0)
        inputs = data["inputs"][hp["input_set"]]
        for t, (entry, exp) in enumerate(zip(inputs, data["expected"][name], strict=True)):
            state, decision = strategy.update(state, Window([_doremi_report(t, entry, K)], K))
            where = f"{name} step {t}"
            assert_close(
                decision.params["excess_loss"],
                exp["perdomain_scores"],
                rtol=tol["rtol"],
                atol=1e-6,
                what=f"{where} perdomain_scores",
            )
            assert_close(
                decision.weights,
                exp["train_domain_weights"],
                rtol=tol["rtol"],
                atol=tol["atol"],
                what=f"{where} train_domain_weights",
            )
            assert_close(
                decision.params["avg_weights"],
                exp["avg_domain_weights"],
                rtol=tol["rtol"],
                atol=tol["atol"],
                what=f"{where} avg_domain_weights",
            )
            assert state["avg_count"] == exp["update_counter"], where


# ------------------------------------------------------------------------------------- Aioli


def test_aioli_update_matches_reference(conformance, assert_close):
    data = conformance("aioli")
    tol = {"rtol": data["tolerance"]["rtol"], "atol": data["tolerance"]["atol"]}
    K = data["hyperparameters"]["common"]["K"]
    prior = np.full(K, 1.0 / K)
    for name, hp in data["hyperparameters"]["scenarios"].items():
        p, E = prior.copy(), None
        ohf = hp["one_hot_factor"]
        for rnd, exp in zip(data["inputs"]["scenarios"][name], data["expected"][name], strict=True):
            where = f"{name} round {rnd['round']}"
            order = rnd["lp_mixture_order"]
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


@pytest.mark.parametrize(
    "scenario",
    [
        "full_slimpj_script",
        "arxiv_books_stackexchange_script",
        "parser_defaults_no_ema_eta20",
        "diagonal_ohf0.75_ema0.1",
    ],
)
def test_aioli_strategy_matches_reference(conformance, assert_close, make_spec, scenario):
    """Drive the strategy's probe state machine with validation-loss reports; the recorded probe
    order replaces the strategy's own draw once each round has started."""
    data = conformance("aioli")
    tol = {"rtol": data["tolerance"]["rtol"], "atol": data["tolerance"]["atol"]}
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
            step = state["segment_start"] + hp["lp_steps"] - 1
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


def _doge_inputs(data: dict, name: str) -> tuple[list[int], list[int], list[list[np.ndarray | None]]]:
    hp = data["hyperparameters"]["scenarios"][name]
    absent = set()
    if name == "config_with_absent_domains":
        absent = {tuple(x) for x in data["hyperparameters"]["absent_domains_in_config_with_absent_domains"]}
    steps = []
    for t, step in enumerate(data["inputs"]["steps"]):
        grads = [None if (t, d) in absent else np.asarray(g) for d, g in enumerate(step["domain_gradients"])]
        steps.append(grads if hp["tgt_is_mix"] else grads[:5])
    train = list(range(5))
    target = [5] if hp["tgt_is_mix"] else train
    return train, target, steps


def test_doge_update_matches_reference(conformance, assert_close):
    data = conformance("doge")
    tol = data["tolerance"]
    lr = data["inputs"]["lr_t"]
    for name, hp in data["hyperparameters"]["scenarios"].items():
        train, target, steps = _doge_inputs(data, name)
        w, rows, total = np.full(5, 0.2), np.zeros((len(steps[0]), 32)), np.zeros(5)
        for t, (grads, exp) in enumerate(zip(steps, data["expected"][name], strict=True)):
            w, rows, model_grad = doge_update(
                w,
                rows,
                grads,
                train=train,
                target=target,
                lr=lr[t],
                mu=hp["mu"],
                max_grad_norm=hp["max_grad_norm"],
            )
            total += w
            where = f"{name} step {t}"
            assert_close(w, exp["train_dw"], rtol=tol["rtol"], atol=tol["atol"], what=f"{where} train_dw")
            assert_close(
                total / (t + 1), exp["avg_dw"], rtol=tol["rtol"], atol=tol["atol"], what=f"{where} avg_dw"
            )
            assert_close(
                np.linalg.norm(rows, axis=1),
                exp["clipped_grad_norms"],
                rtol=tol["rtol"],
                atol=tol["atol"],
                what=f"{where} clipped_grad_norms",
            )
            assert_close(
                model_grad,
                exp["model_grad_after_reweighting"],
                rtol=tol["rtol"],
                atol=1e-6,
                what=f"{where} model_grad",
            )


def test_dga_strategy_reproduces_doge_from_scalar_alignments(conformance, assert_close, make_spec):
    """The worker sends W_i = <g_i, g_target>, the mean gradient norm and lr_t; dga with eta = 1/mu,
    no EMA and DoGE's clip range then gives DoGE's weights."""
    data = conformance("doge")
    tol = data["tolerance"]
    lr = data["inputs"]["lr_t"]
    for name, hp in data["hyperparameters"]["scenarios"].items():
        train, target, steps = _doge_inputs(data, name)
        params = {"eta": 1.0 / hp["mu"], "clip_min": 0.0, "clip_max": 5.0, "ema": 0.0, "exclude_self": False}
        strategy = build_strategy(make_spec("dga", params, K=5))
        state = strategy.init(0)
        rows = np.zeros((len(steps[0]), 32))
        for t, (grads, exp) in enumerate(zip(steps, data["expected"][name], strict=True)):
            for i, g in enumerate(grads):
                if g is not None:
                    rows[i] = clip_gradient(g, hp["max_grad_norm"])
            T = rows[train]
            alignment = T @ rows[target].sum(axis=0)
            extra = {"grad_norm_mean": float(np.linalg.norm(T, axis=1).mean()), "lr": lr[t]}
            report = Report(step=t, source="w", alignment=alignment, extra=extra)
            state, decision = strategy.update(state, Window([report], 5))
            assert_close(
                decision.weights, exp["train_dw"], rtol=tol["rtol"], atol=tol["atol"], what=f"{name} step {t}"
            )
            assert_close(
                decision.params["avg_weights"],
                exp["avg_dw"],
                rtol=tol["rtol"],
                atol=tol["atol"],
                what=f"{name} step {t} avg",
            )
