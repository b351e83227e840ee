"""The service owns the token-level weightings' parameters (TLDR `token-loss`, PRIOR
`token-reference`): every version carries them, replay re-derives them, and bad values are
refused at job creation naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import pytest

from mixer.client import MixerClient
from mixer.replay import verify
from mixer.signals import Report
from mixer.store import Store
from mixer.weighting import parse_weighting_params

K = 3
CASES = json.loads((Path(__file__).parent / "data" / "token_cases.json").read_text())["cases"]
# One case per method, with the most parameters.
SPECS = {c["method"]: c["params"] for c in sorted(CASES, key=lambda c: len(c["params"]))}


def spec(job: str, method: str, params: dict) -> dict:
    return {
        "name": job,
        "domains": [f"d{i}" for i in range(K)],
        "strategy": "odm",
        "cadence": {"update_every": 2},
        "weighting": {"name": method, "params": params},
    }


@pytest.mark.parametrize("method", sorted(SPECS))
def test_versions_carry_the_params_and_replay_reproduces_them(server, method: str) -> None:
    job = f"{method}-svc"
    params = {**SPECS[method], "burn_in": 4}
    with MixerClient(server.address) as c:
        _, created = c.create_job(spec(job, method, params))
        assert created
        for step in range(8):
            r = Report(step=step, source="w0")
            r.domain_token_count = np.full(K, 64.0)
            r.domain_sample_count = np.full(K, 2, dtype=np.int64)
            r.domain_loss_sum = 64.0 * (np.array([2.0, 3.0, 4.0]) + 1.0 / (step + 1))
            r.extra = {f"token_weight_mean.{d}": 1.0 + 0.1 * d for d in range(K)}
            c.report(job, r)
        versions = c.list_versions(job)
    assert len(versions) >= 3
    for v in versions:
        assert parse_weighting_params(method, v.params["weighting"]) == parse_weighting_params(method, params)
    store = Store(server.db)
    try:
        result = verify(store, job)
    finally:
        store.close()
    assert result.ok, result.to_dict()


@pytest.mark.parametrize(
    "method,params,field",
    [
        ("token-reference", {"alpha": 20.0}, "alpha"),
        ("token-reference", {"burn_in": -3}, "burn_in"),
        ("token-loss", {"alpha": 1.0}, "alpha"),
    ],
)
def test_bad_params_are_refused_naming_the_field(server, method: str, params: dict, field: str) -> None:
    with MixerClient(server.address) as c, pytest.raises(grpc.RpcError) as e:
        c.create_job(spec(f"{method}-bad-{field}", method, params))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"weighting.params.{field}" in e.value.details()
