"""The service owns PRESENCE's parameters: every version carries them, replay re-derives them, and
bad values are refused at job creation naming the field."""

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
from mixer.weighting.params import PresenceParams

K = 3
PARAMS = json.loads((Path(__file__).parent / "data" / "presence_cases.json").read_text())["weight_cases"][0][
    "params"
]


def spec(job: str, params: dict) -> dict:
    return {
        "name": job,
        "domains": [f"d{i}" for i in range(K)],
        "strategy": "odm",
        "cadence": {"update_every": 2},
        "weighting": {"name": "presence", "params": params},
    }


def test_versions_carry_the_params_and_replay_reproduces_them(server) -> None:
    job = "presence-svc"
    with MixerClient(server.address) as c:
        _, created = c.create_job(spec(job, PARAMS))
        assert created
        for step in range(8):
            r = Report(step=step, source="w0")
            r.domain_token_count = np.full(K, 64.0)
            r.domain_sample_count = np.full(K, 2, dtype=np.int64)
            r.domain_loss_sum = 64.0 * (np.array([2.0, 3.0, 4.0]) + 1.0 / (step + 1))
            c.report(job, r)
        versions = c.list_versions(job)
    assert len(versions) >= 3
    for v in versions:
        assert PresenceParams.parse(v.params["weighting"]) == PresenceParams.parse(PARAMS)
    store = Store(server.db)
    try:
        result = verify(store, job)
    finally:
        store.close()
    assert result.ok, result.to_dict()


@pytest.mark.parametrize(
    "params,field", [({"tau_2": 0.5}, "tau_2"), ({"switch_step": -3}, "switch_step"), ({"tau": 1}, "tau")]
)
def test_bad_params_are_refused_naming_the_field(server, params: dict, field: str) -> None:
    with MixerClient(server.address) as c, pytest.raises(grpc.RpcError) as e:
        c.create_job(spec(f"presence-bad-{field}", params))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"weighting.params.{field}" in e.value.details()
