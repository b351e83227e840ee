"""Job specs: validation names the field; Megatron's --data-path imports as is."""

from __future__ import annotations

import pytest

from mixer.spec import JobSpec, SpecError


def spec(**kw):
    base = {"name": "j", "domains": ["a", "b"]}
    base.update(kw)
    return JobSpec.from_dict(base)


def test_data_path_weighted_form_imports():
    s = JobSpec.from_dict({"name": "j", "data_path": "0.3 /data/web_text 0.7 /data/code_text"})
    assert [d.name for d in s.domains] == ["web_text", "code_text"]
    assert [d.prefix for d in s.domains] == ["/data/web_text", "/data/code_text"]
    assert s.prior() == pytest.approx([0.3, 0.7])


def test_data_path_plain_prefixes_and_clashing_basenames():
    s = JobSpec.from_dict({"name": "j", "data_path": ["/x/text", "/y/text"]})
    assert [d.name for d in s.domains] == ["text", "text_2"]
    assert s.prior() == [0.5, 0.5]


@pytest.mark.parametrize(
    "data, field, needle",
    [
        ({"name": "j", "data_path": "0.3 a 0.7"}, "data_path", "pairs"),
        ({"name": "j", "domains": ["a", "a"]}, "domains[1].name", "duplicate"),
        ({"name": "j", "domains": []}, "domains", "at least one"),
        ({"name": "bad name!", "domains": ["a"]}, "name", "letters"),
        ({"name": "j", "domains": ["a"], "strategy": {"name": "nope"}}, "strategy.name", "available"),
        ({"name": "j", "domains": ["a"], "strategy": {"name": "odm", "params": {"alpha": 2}}}, "strategy.params.alpha", "[0, 1)"),
        ({"name": "j", "domains": ["a"], "cadence": {"update_every": 0}}, "cadence.update_every", "positive"),
        ({"name": "j", "domains": ["a", "b"], "cadence": {"min_weight": 0.6}}, "cadence.min_weight", "exceeds 1"),
        ({"name": "j", "domains": ["a"], "cadence": {"typo": 1}}, "cadence.typo", "unknown field"),
        ({"name": "j", "domains": [{"name": "a", "weight": -1}]}, "domains[0].weight", ">= 0"),
        ({"name": "j", "domains": ["a"], "unit": "bytes"}, "unit", "samples"),
        ({"name": "j", "domains": ["a"], "weighting": {"name": "nope"}}, "weighting.name", "available"),
        ({"name": "j", "domains": ["a"], "strategy": {"name": "static", "params": {"mode": "temperature"}}}, "domains", "size"),
    ],
)
def test_invalid_specs_name_the_field(data, field, needle):
    with pytest.raises(SpecError) as err:
        JobSpec.from_dict(data)
    assert err.value.field == field
    assert needle in str(err.value)


def test_yaml_roundtrip_and_fingerprint():
    s = spec(strategy={"name": "odm", "params": {"alpha": 0.5}})
    again = JobSpec.from_yaml(s.to_yaml())
    assert again == s and again.fingerprint() == s.fingerprint()
    assert spec().fingerprint() != s.fingerprint()


def test_not_yaml_is_a_clear_error():
    with pytest.raises(SpecError, match="not valid YAML"):
        JobSpec.from_yaml("name: [unclosed")


def test_unicode_domain_names_are_allowed():
    s = spec(domains=["日本語", "español"])
    assert s.domain_names == ["日本語", "español"]


def test_scientific_notation_is_a_number_in_yaml_and_json():
    assert JobSpec.from_yaml("name: j\ndomains: [a, b]\ncadence: {min_weight: 1e-5}").cadence.min_weight == 1e-5
    assert JobSpec.from_yaml('{"name": "j", "domains": ["a", "b"], "cadence": {"min_weight": 1e-05}}').cadence.min_weight == 1e-5
