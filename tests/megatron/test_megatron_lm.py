"""The Megatron-LM plug-in (mixer.megatron.lm) on megatron-core's parallel_state, four gloo processes.

Each rank runs tests/megatron/_lm_worker.py: Megatron's call pattern (data on tensor rank 0 of the
first and last stages, the batch broadcast over tensor ranks, activations sent between stages, the
schedule's own `forward_step_calc_loss`), with a real mixer server and an adaptive strategy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mixer.client import MixerClient
from mixer.megatron.model import _free_port
from mixer.megatron.sampler import split_sample_id
from mixer.spec import JobSpec

WORKER = Path(__file__).with_name("_lm_worker.py")


def run_ranks(tmp_path: Path, name: str, spec_path: Path, **cfg) -> list[dict]:
    """Start cfg world ranks of the worker, wait, and return each rank's result."""
    out = tmp_path / name
    out.mkdir()
    config = {
        "port": _free_port(),
        "spec": str(spec_path),
        "seq": 16,
        "mbs": 2,
        "gbs": 8,
        "workers": 2,
        "sync": 2,
        "steps": 12,
        "per_token": False,
        "cache": str(tmp_path / "cache"),
        "out": str(out),
        **cfg,
    }
    path = out / "config.json"
    path.write_text(json.dumps(config))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(path), str(r)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(config["world"])
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError("ranks did not finish (a collective deadlocked?)") from None
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(config["world"])]


def expected_sample_loss(sample_ids: list[int], datasets: list) -> np.ndarray:
    """Per-sample token-mean loss of the worker's model, recomputed here in float64."""
    sys.path.insert(0, str(WORKER.parent))
    from _lm_worker import first_stage, model_params, per_token_loss

    emb, theta = model_params(257)
    out = []
    for sid in sample_ids:
        d, i = split_sample_id(sid)
        item = datasets[d][i]
        loss = per_token_loss(first_stage(item["tokens"], emb), item["labels"], theta).double()
        mask = item["loss_mask"].double()
        out.append(float((loss * mask).sum() / mask.sum().clamp(min=1)))
    return np.asarray(out)


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize(("tp", "pp", "cp"), [(1, 2, 1), (2, 1, 1), (1, 1, 2)])
def test_four_ranks_report_once_and_apply_versions_together(tp, pp, cp, write_spec, server, tmp_path) -> None:
    spec_path = write_spec(f"lm-tp{tp}-pp{pp}-cp{cp}", "odm", cadence={"update_every": 2, "min_weight": 0.02})
    spec = JobSpec.from_yaml(spec_path.read_text())
    # The reporting rank creates the job itself (idempotent), as a Megatron-LM run does.
    results = run_ranks(tmp_path, "run", spec_path, world=4, tp=tp, pp=pp, cp=cp, address=server.address)
    steps = 12

    data_ranks = [r for r in results if r["reads_data"]]
    assert len(data_ranks) == 4 // tp, "tensor rank 0 of the first and last stages read data"
    applied = [r["applied"] for r in data_ranks]
    assert all(a == applied[0] for a in applied), f"ranks applied versions at different steps: {applied}"
    assert len(applied[0]) >= 3, f"the adaptive strategy produced too few versions: {applied[0]}"
    # A version announced at a sync step can only take effect after the loader's prefetch horizon.
    assert all(step >= 1 for _, step in applied[0][1:])

    reporters = [r for r in results if r["reports"]]
    assert (
        len(reporters) == 1
        and reporters[0]["last"]
        and reporters[0]["tp_rank"] == reporters[0]["cp_rank"] == 0
    )
    assert reporters[0]["reported"] == list(range(steps))
    assert all(not r["reported"] for r in results if not r["reports"])
    with MixerClient(server.address) as client:
        assert client.get_job(spec.name).report_count == steps

    # What was reported is the global batch: every data-parallel rank's micro-batches, in rank order,
    # with the per-sample losses of those samples.
    # Context-parallel ranks of one data-parallel rank read the same samples (each keeps a slice
    # of every sequence); the per-sample losses reported are over whole sequences.
    firsts = sorted((r for r in data_ranks if r["first"] and r["cp_rank"] == 0), key=lambda r: r["dp_rank"])
    num_mb = 8 // (2 * len(firsts))

    from _lm_worker import gpt_config

    from mixer.megatron.lm import domain_datasets

    config = gpt_config(16, str(tmp_path / "cache"))
    datasets = domain_datasets(config, [d.prefix for d in spec.domains], "train")
    versions = {s: v for v, s in applied[0]}
    for rec in reporters[0]["host"]:
        step = rec["step"]
        ids = [sid for r in firsts for mb in r["consumed"][step * num_mb : (step + 1) * num_mb] for sid in mb]
        assert rec["sample_id"] == ids
        np.testing.assert_allclose(rec["sample_loss"], expected_sample_loss(ids, datasets), rtol=1e-5)
        doms = np.asarray([split_sample_id(s)[0] for s in ids])
        assert np.asarray(rec["domain_token_count"]).sum() == 16 * len(ids)
        assert np.asarray(rec["domain_token_count"])[doms].min() > 0
        in_force = max((s, v) for s, v in versions.items() if s <= step)[1]
        assert rec["version"] == in_force


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("per_token", [False, True])
def test_weighted_gradient_is_the_same_at_any_data_parallel_size(per_token, write_spec, tmp_path) -> None:
    spec_path = write_spec(
        "lm-weighted", "static", weighting={"name": "loss", "params": {"method": "linupper", "burn_in": 0}}
    )
    spec = JobSpec.from_yaml(spec_path.read_text())
    assert spec.weighting.name == "loss"
    two = run_ranks(
        tmp_path, "dp2", spec_path, world=2, tp=1, pp=1, mbs=2, gbs=4, steps=1, per_token=per_token
    )
    one = run_ranks(
        tmp_path, "dp1", spec_path, world=1, tp=1, pp=1, mbs=4, gbs=4, steps=1, per_token=per_token
    )
    assert two[0]["host"][0]["sample_id"] == one[0]["host"][0]["sample_id"], "the same global batch"
    g1 = np.load(tmp_path / "dp1" / "grad0.npy")
    for r in (0, 1):
        g2 = np.load(tmp_path / "dp2" / f"grad{r}.npy")
        np.testing.assert_allclose(g2, g1, rtol=1e-5, atol=1e-7)
    assert np.abs(g1).sum() > 0
    # The weighting really weighs: the global batch's weights are not all equal, and the two ranks'
    # halves are the one process's weights (normalised over the whole global batch).
    w1 = np.asarray(one[0]["weights"][0])
    assert w1.std() > 0.05
    np.testing.assert_allclose(np.concatenate([two[0]["weights"][0], two[1]["weights"][0]]), w1, rtol=1e-5)


def _megatron_args(spec: Path, *extra: str):
    """The arguments the plug-in reads, parsed as Megatron-LM would hand them over."""
    import argparse

    from mixer.megatron import lm

    parser = lm.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--mixer-spec", str(spec), *extra])
    args.micro_batch_size, args.global_batch_size, args.num_workers = 2, 8, 2
    args.dataloader_type = "external"
    return args


@pytest.mark.parametrize(
    ("extra", "change", "named"),
    [
        ((), {"dataloader_type": "single"}, "--dataloader-type external"),
        ((), {"rampup_batch_size": [4, 4, 100]}, "--rampup-batch-size"),
        ((), {"sft": True}, "packed sequences"),
        (("--mixer-sync-interval", "0"), {}, "--mixer-sync-interval must be an integer in [1, 1000000], got 0"),
        (("--mixer-prefetch-factor", "0"), {}, "--mixer-prefetch-factor must be an integer in [1, 64], got 0"),
        ((), {"num_workers": -1}, "--num-workers must be an integer in [0, 1024], got -1"),
        ((), {"micro_batch_size": 0}, "--micro-batch-size must be an integer in [1, "),
    ],
)
def test_the_plug_in_refuses_settings_it_cannot_run_by_name(write_spec, extra, change, named) -> None:
    from mixer.megatron import lm

    args = _megatron_args(write_spec("lm-args"), *extra)
    for k, v in change.items():
        setattr(args, k, v)
    with pytest.raises(ValueError) as err:
        lm.settings_from_args(args)
    assert named in str(err.value)


def test_the_plug_in_reads_its_settings_from_megatron_arguments(write_spec) -> None:
    from mixer.megatron import lm

    args = _megatron_args(write_spec("lm-args"), "--mixer-sync-interval", "4", "--mixer", "h:1")
    s = lm.settings_from_args(args)
    assert (s.sync_interval, s.address, s.micro_batch_size, s.global_batch_size) == (4, "h:1", 2, 8)
    assert s.spec.name == "lm-args"
