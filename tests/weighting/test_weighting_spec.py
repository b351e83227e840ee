"""Instance weighting in job specs: registered names, allowed params, value checks."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mixer.spec import JobSpec, SpecError
from mixer.weighting import METHODS, parse_weighting_params
from mixer.weighting.params import DwmParams, LossParams, TopicParams


def spec(weighting: dict) -> JobSpec:
    return JobSpec.from_dict({"name": "job", "domains": ["a", "b"], "weighting": weighting})


def test_methods_are_registered_with_their_params() -> None:
    assert METHODS["loss"] == {"method", "delta", "r", "burn_in"}
    assert METHODS["topic"] == {"topic_weights", "normalize"}
    assert METHODS["dwm"] == {
        "model",
        "init_from",
        "frozen",
        "hidden",
        "lr",
        "eta",
        "optimizer",
        "momentum",
        "num_topics",
        "seq_len",
        "total_steps",
    }


def test_specs_validate_and_parse() -> None:
    s = spec({"name": "loss", "params": {"method": "mid", "r": 0.4}})
    assert parse_weighting_params(s.weighting.name, s.weighting.params) == LossParams(
        method="quadratic", r=0.4
    )
    assert parse_weighting_params("topic", {"topic_weights": [1, 0]}) == TopicParams(topic_weights=(1.0, 0.0))
    assert parse_weighting_params("dwm", {"hidden": 8}) == DwmParams(hidden=8)
    assert parse_weighting_params("none", {}) is None
    spec({"name": "dwm"})
    spec("topic")


@pytest.mark.parametrize(
    "weighting, field",
    [
        ({"name": "loss", "params": {"r": -1}}, "weighting.params.r"),
        ({"name": "loss", "params": {"method": "uniformish"}}, "weighting.params.method"),
        ({"name": "loss", "params": {"kl_reg": 1}}, "weighting.params.kl_reg"),
        ({"name": "topic", "params": {"topic_weights": [-1]}}, "weighting.params.topic_weights[0]"),
        ({"name": "dwm", "params": {"optimizer": "lbfgs"}}, "weighting.params.optimizer"),
        ({"name": "dwm", "params": {"momentum": 1.0}}, "weighting.params.momentum"),
        ({"name": "dwm", "params": {"hidden": 0}}, "weighting.params.hidden"),
        ({"name": "nope"}, "weighting.name"),
    ],
)
def test_bad_values_name_the_field(weighting: dict, field: str) -> None:
    with pytest.raises(SpecError) as e:
        spec(weighting)
    assert e.value.field == field


def test_weighting_params_do_not_import_torch() -> None:
    # Spec validation runs in light processes (CLI, service start-up); torch stays on the worker path.
    code = (
        "import sys; from mixer.weighting import parse_weighting_params; "
        "[parse_weighting_params(n, {}) for n in ('loss', 'topic', 'dwm')]; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
