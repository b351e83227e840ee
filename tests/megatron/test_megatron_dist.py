"""Two data-parallel ranks (gloo, two processes) through `python -m mixer.megatron.pretrain`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _helpers import pretrain_args

from mixer.client import MixerClient
from mixer.megatron.data import build_domain_datasets
from mixer.megatron.model import _free_port
from mixer.megatron.sampler import MixtureSampler, make_sample_id
from mixer.spec import JobSpec


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_ranks_switch_versions_together_on_disjoint_slices(write_spec, server, tmp_path: Path) -> None:
    spec_path = write_spec("two-ranks", "odm", cadence={"update_every": 3, "min_weight": 0.02})
    steps, world = 24, 2
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "PYTHONWARNINGS": "ignore",
        }
        args = pretrain_args(
            spec_path, "--mixer", server.address, "--result", str(tmp_path / f"rank{rank}.json"), steps=steps
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "mixer.megatron.pretrain", *args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    for p in procs:
        out, _ = p.communicate(timeout=110)
        assert p.returncode == 0, out[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world))

    # Both ranks applied every version at the same step, and some versions came from the service.
    assert r0["versions"] == r1["versions"] and r0["applied"] == r1["applied"]
    assert len(r0["applied"]) > 2, r0["applied"]
    # Each rank trained on its own half; the halves are disjoint and make up the global batch.
    for a, b, whole in zip(r0["local_sample_ids"], r1["local_sample_ids"], r0["sample_ids"]):
        assert len(a) == len(b) == 4 and not set(a) & set(b)
        assert a + b == whole
    # The global batch is the one a single sampler draws when it applies the same versions.
    spec = JobSpec.from_yaml(spec_path.read_text())
    with MixerClient(server.address) as client:
        weights = {v.version: v.weights.tolist() for v in client.list_versions("two-ranks")}
        assert client.get_job("two-ranks").report_count == steps + len(
            r0["val_history"]
        )  # rank 0 alone reports
    lengths = [
        len(d)
        for d in build_domain_datasets(
            [d.prefix for d in spec.domains], 32, spec.seed, None, tmp_path / "cache"
        )
    ]
    sampler = MixtureSampler(spec.num_domains, 8, weights[0], fingerprint="x", dataset_lengths=lengths)
    applied = {step: version for version, step in r0["applied"][1:]}
    for step in range(steps):
        if step in applied:
            sampler.set_weights(weights[applied[step]], applied[step], step)
        assert [make_sample_id(d, i) for d, i in sampler.next_global_batch(step)] == r0["sample_ids"][step]
