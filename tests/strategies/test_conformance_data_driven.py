"""The conformance tests follow the vector files, not the other way round.

Both tests run the conformance test files in a pytest subprocess with $MIXER_CONFORMANCE_DIR
pointing at a modified copy of the vectors:
- scenarios renamed (shared input sets too), one dropped, the rest shuffled, numbers unchanged: every
  test passes, and the test cases collected are exactly those the modified files call for;
- one expected number per file pushed far beyond tolerance: exactly the test cases that compare
  that number fail, each at that number, and everything else passes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from tests.conformance_dir import ENV, conformance_dir

ROOT = Path(__file__).resolve().parents[2]
STRATEGIES = "tests/strategies/test_strategy_conformance.py"
SOW = "tests/weighting/test_sow_conformance.py"
# vector file -> the test file that reads it
VECTORS = {
    "odm": STRATEGIES,
    "doremi": STRATEGIES,
    "aioli": STRATEGIES,
    "doge": STRATEGIES,
    "sow_loss_reweighting": SOW,
}
SOW_FILE = "sow_loss_reweighting"
ABSENT_PREFIX = "absent_domains_in_"  # doge: per-scenario lists keyed by scenario name

pytestmark = pytest.mark.slow


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def _read(name: str) -> dict[str, Any]:
    return json.loads((conformance_dir(f"{name}.json") / f"{name}.json").read_text())


def _scenario_names(file: str, data: dict) -> list[str]:
    if file == SOW_FILE:
        return [b["name"] for b in data["inputs"]["batches"]]
    return list(data["hyperparameters"]["scenarios"])


def _rewrite(file: str, data: dict, order: list[str], rename: dict[str, str]) -> dict:
    """A copy of `data` holding only the scenarios in `order`, in that order, under their new names."""
    d = copy.deepcopy(data)

    def remap(by_name: dict) -> dict:
        return {rename[n]: by_name[n] for n in order}

    d["expected"] = remap(d["expected"])
    if file == SOW_FILE:
        batches = {b["name"]: b for b in d["inputs"]["batches"]}
        d["inputs"]["batches"] = [{**batches[n], "name": rename[n]} for n in order]
        return d
    hp = d["hyperparameters"]
    hp["scenarios"] = remap(hp["scenarios"])
    if "scenarios" in d["inputs"]:
        d["inputs"]["scenarios"] = remap(d["inputs"]["scenarios"])
    used_sets = {h["input_set"] for h in hp["scenarios"].values() if "input_set" in h}
    new_sets = {s: f"inputs_{_digest(s)}" for s in sorted(used_sets)}
    for old, new in new_sets.items():
        d["inputs"][new] = d["inputs"].pop(old)
    for h in hp["scenarios"].values():
        if "input_set" in h:
            h["input_set"] = new_sets[h["input_set"]]
    for key in [k for k in hp if k.startswith(ABSENT_PREFIX)]:
        old, value = key[len(ABSENT_PREFIX) :], hp.pop(key)
        if old in order:
            hp[ABSENT_PREFIX + rename[old]] = value
    return d


def _modified_copy(folder: Path) -> dict[str, list[str]]:
    """Writes the renamed / one-dropped / shuffled vectors to `folder`; returns each file's new
    scenario names in their new order."""
    rng = random.Random(15)
    kept: dict[str, list[str]] = {}
    for file in VECTORS:
        data = _read(file)
        names = _scenario_names(file, data)
        assert len(names) >= 3, f"{file}: too few scenarios to drop one and shuffle the rest"
        order = [n for i, n in enumerate(names) if i != 1]  # drop the second
        original = list(order)
        while order == original:
            rng.shuffle(order)
        rename = {n: f"s{i}_{_digest(file + n)}" for i, n in enumerate(names)}
        new = _rewrite(file, data, order, rename)
        (folder / f"{file}.json").write_text(json.dumps(new))
        kept[file] = _scenario_names(file, new)
        assert kept[file] == [rename[n] for n in order] and not set(kept[file]) & set(names)
    return kept


def _expected_cases(folder: Path) -> dict[str, set[str]]:
    """Test function -> the parameter ids the files in `folder` call for (by hyperparameters and data)."""
    v = {f: json.loads((folder / f"{f}.json").read_text()) for f in VECTORS}
    hps = {f: v[f]["hyperparameters"]["scenarios"] for f in VECTORS if f != SOW_FILE}
    cases: dict[str, set[str]] = {
        f"{STRATEGIES}::test_every_scenario_of_the_file_is_covered": set(hps),
        f"{STRATEGIES}::test_odm_update_matches_reference": set(hps["odm"]),
        f"{STRATEGIES}::test_odm_strategy_matches_reference": {
            n for n, h in hps["odm"].items() if h["method"] == "exp3" or h["kind"] == "group"
        },
        f"{STRATEGIES}::test_doremi_matches_reference": set(hps["doremi"]),
        f"{STRATEGIES}::test_aioli_update_matches_reference": set(hps["aioli"]),
        f"{STRATEGIES}::test_aioli_strategy_matches_reference": set(hps["aioli"]),
        f"{STRATEGIES}::test_doge_absent_domain_lists_name_scenarios": {""},
        f"{STRATEGIES}::test_doge_update_matches_reference": set(hps["doge"]),
        f"{STRATEGIES}::test_dga_strategy_reproduces_doge_from_scalar_alignments": set(hps["doge"]),
    }
    sow = v[SOW_FILE]
    batches = sow["inputs"]["batches"]
    per_case = {
        f"{b['name']}-{strategy}-r{r}"
        for b in batches
        for strategy, by_r in sow["expected"][b["name"]]["by_strategy"].items()
        for r in by_r
    }
    hp = sow["hyperparameters"]
    assert len(per_case) == len(batches) * len(hp["strategies run"]) * len(hp["kl_reg (r) values run"])
    cases[f"{SOW}::test_file_covers_every_batch_strategy_and_r"] = {""}
    for test in ("numpy_reference_matches_h_f_weights_and_loss", "torch_float64_matches_at_file_tolerance"):
        cases[f"{SOW}::test_{test}"] = set(per_case)
    cases[f"{SOW}::test_torch_float32_matches_at_float32_tolerance"] = set(per_case)
    cases[f"{SOW}::test_burn_in_path_matches_no_reweighting"] = {b["name"] for b in batches}
    cases[f"{SOW}::test_all_equal_batch_gives_uniform_weights"] = {
        b["name"] for b in batches if len(set(b["per_sample_loss"])) == 1
    }
    return cases


def _run(folder: Path, xml: Path) -> dict[str, tuple[str, str]]:
    """Runs both conformance test files against `folder`; node id -> (outcome, failure text)."""
    env = dict(os.environ, **{ENV: str(folder)})
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--junitxml={xml}",
        STRATEGIES,
        SOW,
    ]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert xml.is_file(), (
        f"pytest wrote no report (rc {proc.returncode}):\n{proc.stdout[-4000:]}{proc.stderr}"
    )
    results: dict[str, tuple[str, str]] = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        module = case.get("classname", "").replace(".", "/") + ".py"
        outcome, text = "passed", ""
        for kind in ("failure", "error", "skipped"):
            child = case.find(kind)
            if child is not None:
                outcome, text = kind, f"{child.get('message', '')}\n{child.text or ''}"
        results[f"{module}::{case.get('name')}"] = (outcome, text)
    assert results, proc.stdout[-4000:]
    return results


def _node(test: str, param: str) -> str:
    return f"{test}[{param}]" if param else test


def test_conformance_tests_follow_renamed_dropped_and_shuffled_scenarios(tmp_path):
    folder = tmp_path / "vectors"
    folder.mkdir()
    kept = _modified_copy(folder)
    expected = _expected_cases(folder)
    results = _run(folder, tmp_path / "report.xml")
    bad = {n: r for n, r in results.items() if r[0] in ("failure", "error")}
    assert not bad, "\n\n".join(f"{n}: {t[:2000]}" for n, (_, t) in bad.items())
    want = {_node(t, p) for t, params in expected.items() for p in params}
    got = {n for n, (outcome, _) in results.items() if outcome == "passed"}
    assert got == want, f"missing {sorted(want - got)}; unexpected {sorted(got - want)}"
    skipped = {n for n, (outcome, _) in results.items() if outcome == "skipped"}
    # pytest skips a test whose parameter list is empty; only those may be skipped.
    assert {n.split("[")[0] for n in skipped} <= {t for t, params in expected.items() if not params}
    per_file = {f: sum(1 for n in got if n.startswith(f + "::")) for f in (STRATEGIES, SOW)}
    assert per_file == {
        f: sum(len(p) for t, p in expected.items() if t.startswith(f + "::")) for f in per_file
    }
    # every kept scenario of every file is some test case's parameter
    for file, names in kept.items():
        test_file = VECTORS[file]
        for name in names:
            assert any(n.startswith(test_file + "::") and name in n for n in got), f"{file}: {name} not run"


def _bump(value: float) -> float:
    """Far beyond every tolerance the tests use (at most rtol 1e-4, atol 1e-6)."""
    return value + max(1e-3, 1e-2 * abs(value))


def test_a_number_beyond_tolerance_fails_exactly_its_tests(tmp_path):
    folder = tmp_path / "vectors"
    folder.mkdir()
    should_fail: dict[str, str] = {}  # node id -> text its failure must contain
    for file in VECTORS:
        data = _read(file)
        name = _scenario_names(file, data)[0]
        if file == "odm":
            hp = data["hyperparameters"]["scenarios"][name]
            steps = data["expected"][name]
            t = max(i for i, e in enumerate(steps) if e["update_applied"])
            steps[t]["probabilities"][0] = _bump(steps[t]["probabilities"][0])
            it = data["inputs"]["scenarios"][name][t]["iteration"]
            should_fail[f"{STRATEGIES}::test_odm_update_matches_reference[{name}]"] = (
                f"{name} iteration {it} probabilities"
            )
            if hp["method"] == "exp3" or hp["kind"] == "group":
                should_fail[f"{STRATEGIES}::test_odm_strategy_matches_reference[{name}]"] = f"{name} it {it}:"
        elif file == "doremi":
            t = len(data["expected"][name]) - 1
            exp = data["expected"][name][t]
            exp["train_domain_weights"][0] = _bump(exp["train_domain_weights"][0])
            should_fail[f"{STRATEGIES}::test_doremi_matches_reference[{name}]"] = (
                f"{name} step {t} train_domain_weights"
            )
        elif file == "aioli":
            exp = data["expected"][name][-1]
            exp["proportions"][0] = _bump(exp["proportions"][0])
            rnd = data["inputs"]["scenarios"][name][-1]["round"]
            for test in ("update", "strategy"):
                should_fail[f"{STRATEGIES}::test_aioli_{test}_matches_reference[{name}]"] = (
                    f"{name} round {rnd} proportions"
                )
        elif file == "doge":
            t = len(data["expected"][name]) - 1
            exp = data["expected"][name][t]
            exp["train_dw"][0] = _bump(exp["train_dw"][0])
            should_fail[f"{STRATEGIES}::test_doge_update_matches_reference[{name}]"] = (
                f"{name} step {t} train_dw"
            )
            should_fail[f"{STRATEGIES}::test_dga_strategy_reproduces_doge_from_scalar_alignments[{name}]"] = (
                f"{name} step {t}:"
            )
        else:
            by_strategy = data["expected"][name]["by_strategy"]
            strategy = next(iter(by_strategy))
            r = next(iter(by_strategy[strategy]))
            weights = by_strategy[strategy][r]["weights"]
            weights[0] = _bump(weights[0])
            for test in (
                "numpy_reference_matches_h_f_weights_and_loss",
                "torch_float64_matches_at_file_tolerance",
                "torch_float32_matches_at_float32_tolerance",
            ):
                should_fail[f"{SOW}::test_{test}[{name}-{strategy}-r{r}]"] = f"{name}/{strategy}/r={r}"
        (folder / f"{file}.json").write_text(json.dumps(data))
    results = _run(folder, tmp_path / "report.xml")
    failed = {n for n, (outcome, _) in results.items() if outcome != "passed"}
    assert failed == set(should_fail), (
        f"should fail but did not: {sorted(set(should_fail) - failed)}; failed too: {sorted(failed - set(should_fail))}"
    )
    for node, fragment in should_fail.items():
        outcome, text = results[node]
        assert outcome == "failure", f"{node}: {outcome}\n{text[:2000]}"
        assert fragment in text, f"{node} failed elsewhere than at the perturbed number:\n{text[:2000]}"
    assert sum(1 for outcome, _ in results.values() if outcome == "passed") == len(results) - len(should_fail)
