"""The Data Mixing Agent end to end: collect on Ray through a real service, train by CQL, save and
load, deploy as the `agent` strategy of a real pretraining job, replay it; and its bad inputs."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import yaml

from mixer.agent.collect import CollectConfig, collect, load_trajectories
from mixer.agent.policy import AgentFileError, load_agent, strategy_spec
from mixer.agent.train import ACTOR, CARD, WEIGHTS, TrainConfig, save_agent, train, train_on
from mixer.agent.trajectory import Trajectory, TrajectoryError, transitions
from mixer.bench.launch import ServerProcess
from mixer.bench.quality_config import PRESETS
from mixer.client import MixerClient
from mixer.megatron.corpus import write_synthetic_corpus
from mixer.replay import verify
from mixer.spec import JobSpec, SpecError
from mixer.store.repository import Store
from mixer.strategies.agent import state_features
from mixer.transfer import resolve_spec_text

pytestmark = pytest.mark.ray

PROXY = dataclasses.replace(PRESETS["quick"], layers=1, hidden=32, heads=2, seq=32, batch=4, eval_samples=2)
SEGMENTS, SEGMENT_STEPS = 3, 2
FAST = TrainConfig(steps=300, bc_steps=150, hidden=32, batch=64)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A corpus, a real `mixer serve`, and three trajectories collected in two passes (2, then 3)."""
    root = tmp_path_factory.mktemp("agent")
    write_synthetic_corpus(root / "corpus", seed=0, docs_per_domain=60)
    server = ServerProcess(str(root / "mixer.db"), root).start()
    cfg = CollectConfig(trajectories=2, segments=SEGMENTS, segment_steps=SEGMENT_STEPS, proxy=PROXY)
    kw = {"out": root / "out", "corpus": root / "corpus", "mixer": server.address, "progress": False}
    # one local Ray for both passes (collect uses a Ray that is already up): its workers stay warm
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        first = collect(config=cfg, **kw)
        before = {p.name: p.read_bytes() for p in (root / "out" / "trajectories").glob("*.json")}
        second = collect(config=dataclasses.replace(cfg, trajectories=3), **kw)
        yield {"root": root, "server": server, "first": first, "second": second, "before": before}
    finally:
        ray.shutdown()
        server.kill()


@pytest.fixture(scope="module")
def trained(world):
    out = world["root"] / "agent"
    card = train(trajectories=world["root"] / "out", out=out, config=FAST, progress=False)
    return out, card


def test_collect_records_each_trajectory_as_a_job_and_resume_skips_finished_ones(world) -> None:
    first, second = world["first"], world["second"]
    assert first["ran"] == 2 and first["skipped"] == 0 and not first["failed"], first
    assert second["ran"] == 1 and second["skipped"] == 2 and not second["failed"], second
    folder = world["root"] / "out" / "trajectories"
    for name, data in world["before"].items():  # the finished ones were left alone
        assert (folder / name).read_bytes() == data
    trajs = load_trajectories(world["root"] / "out")
    assert len(trajs) == 3
    docs = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    with MixerClient(world["server"].address) as client:
        for tr, doc in zip(trajs, docs):
            assert tr.actions.shape == tr.losses.shape == (SEGMENTS, len(second["domains"]))
            assert list(tr.domains) == second["domains"]
            assert np.allclose(tr.actions.sum(1), 1.0) and np.isfinite(tr.losses).all()
            # the job on the service replays the recorded nominal schedule, one entry per step
            versions = client.list_versions(tr.job)
            assert versions, tr.job
            nominal = np.asarray(doc["nominal"])
            assert np.allclose(versions[0].weights, nominal[0])
            assert any(np.allclose(v.weights, nominal[-1]) for v in versions)
            # what was applied in the first step is what the schedule said (version 0 from step 0)
            assert np.allclose(tr.actions[0], nominal[0], atol=0.5 / SEGMENT_STEPS + 1e-9)
    # the trajectories are random draws: no two alike
    assert len({tuple(np.round(t.actions[0], 6)) for t in trajs}) == 3
    # every collected job is a mixer job whose own replay re-derives its versions
    store = Store(world["server"].db)
    try:
        for tr in trajs:
            assert verify(store, tr.job).ok
    finally:
        store.close()


def test_collected_trajectories_are_ordinary_records(world, tmp_path) -> None:
    """The folder exports as one table whose rows are the trajectory files'; each trajectory's job
    is plotted by `mixer plot` from the service's database, with its validation losses."""
    from click.testing import CliRunner

    from mixer.cli import main

    trajs = load_trajectories(world["root"] / "out")
    out = tmp_path / "trajectories.parquet"
    run = CliRunner().invoke(main, ["agent", "export", str(world["root"] / "out"), "-o", str(out)])
    assert run.exit_code == 0, run.output
    table = pq.read_table(out)
    assert table.column("job").to_pylist() == [t.job for t in trajs for _ in range(SEGMENTS)]
    for k, d in enumerate(trajs[0].domains):
        assert np.array_equal(
            table.column(f"action/{d}").to_numpy(), np.concatenate([t.actions[:, k] for t in trajs])
        )
        assert np.array_equal(
            table.column(f"val_loss/{d}").to_numpy(), np.concatenate([t.losses[:, k] for t in trajs])
        )
    png = tmp_path / "trajectories.png"
    run = CliRunner().invoke(
        main, ["plot", *(t.job for t in trajs[:2]), "-o", str(png), "--db", world["server"].db, "--json"]
    )
    assert run.exit_code == 0, run.output
    drawn = json.loads(run.output.strip().splitlines()[-1])["jobs"]
    assert [j["val_reports"] for j in drawn] == [SEGMENTS, SEGMENTS] and all(j["loss_bins"] for j in drawn)


def test_train_reduces_its_losses(world, trained) -> None:
    _, card = trained
    hist = card["history"]
    assert hist[0]["step"] == 0 and hist[-1]["step"] == FAST.steps - 1
    bc = [h for h in hist if h["step"] < FAST.bc_steps]
    assert bc[-1]["bc_nll"] < bc[0]["bc_nll"], bc  # behaviour cloning fits the recorded actions
    k = max(1, len(hist) // 5)
    first = np.mean([h["td"] for h in hist[:k]])
    last = np.mean([h["td"] for h in hist[-k:]])
    assert last < first, (first, last)  # the critics fit the Bellman targets
    trajs = load_trajectories(world["root"] / "out")
    assert card["data"]["transitions"] == sum(t.actions.shape[0] - 1 for t in trajs)
    assert card["domains"] == list(trajs[0].domains)


def test_saved_agent_round_trips_bit_exactly(trained, tmp_path) -> None:
    folder, _ = trained
    agent = load_agent(folder)
    assert agent.card == json.loads((folder / CARD).read_text())
    save_agent(tmp_path, agent.tensors, agent.card)
    assert (tmp_path / WEIGHTS).read_bytes() == (folder / WEIGHTS).read_bytes()
    again = load_agent(tmp_path)
    assert set(again.tensors) == set(agent.tensors)
    for k, v in agent.tensors.items():
        assert again.tensors[k].dtype == v.dtype and again.tensors[k].tobytes() == v.tobytes(), k
    assert again.model_bytes() == agent.model_bytes()
    params = strategy_spec(folder)["params"]
    spec_model = base64.b64decode(params["model"])
    assert spec_model == agent.model_bytes() == (folder / ACTOR).read_bytes()
    # the spec names the agent by the sha256 of actor.safetensors and by where that file is
    assert params["sha256"] == hashlib.sha256((folder / ACTOR).read_bytes()).hexdigest() == agent.sha256
    assert params["path"] == str((folder / ACTOR).resolve())
    (tmp_path / ACTOR).write_bytes(b"not this agent")
    with pytest.raises(AgentFileError, match="is not the actor of"):
        load_agent(tmp_path)


def test_a_job_with_the_agent_produces_versions_and_replay_verifies_them(world, trained, tmp_path) -> None:
    from mixer.megatron.pretrain import PretrainConfig, run_pretrain

    folder, card = trained
    agent = load_agent(folder)
    prepared = json.loads(next((world["root"] / "out" / "prepared").glob("*/prepared.json")).read_text())
    domains = list(reversed(card["domains"]))  # another order: matched by name
    job = "agent-live"
    spec = {
        "name": job,
        "seed": 3,
        "unit": "samples",
        "strategy": strategy_spec(folder),
        "domains": [{"name": d, "prefix": prepared[d]["train"]} for d in domains],
        "cadence": {"update_every": 1, "min_weight": 0.0},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    rec = run_pretrain(
        PretrainConfig.of(
            spec=path,
            mixer=world["server"].address,
            steps=3 * SEGMENT_STEPS,
            global_batch_size=PROXY.batch,
            seq_length=PROXY.seq,
            layers=PROXY.layers,
            hidden=PROXY.hidden,
            heads=PROXY.heads,
            lr=PROXY.lr,
            eval_interval=SEGMENT_STEPS,
            eval_samples=PROXY.eval_samples,
            progress=False,
            flush_timeout=120.0,
        )
    )
    with MixerClient(world["server"].address) as client:
        versions = client.list_versions(job)
    evals = rec["val_history"]
    assert len(versions) >= 3, versions  # version 0 (the prior) and one per evaluation reported in time
    assert [v.params.get("agent_step") for v in versions[1:]] == list(range(1, len(versions)))
    # version 1 is the agent's proposal for the state after the first evaluation, in the job's order
    order = [card["domains"].index(d) for d in domains]
    e1 = np.asarray(evals[0][1])[np.argsort(order)]  # agent order
    H = card["inputs"]["history"]
    prior = np.full(len(domains), 1 / len(domains))
    x = state_features(np.tile(prior, (H, 1)), np.tile(e1, (H, 1)), e1.mean(), 1, card["inputs"]["horizon"])
    assert np.allclose(versions[1].weights, agent.propose(x)[order], rtol=0, atol=1e-12)
    store = Store(world["server"].db)
    try:
        result = verify(store, job)
    finally:
        store.close()
    assert result.ok and result.versions_checked == len(versions), result.to_dict()


def _spec(model: str, domains: list[str], **params) -> dict:
    return {
        "name": "bad",
        "domains": domains,
        "strategy": {"name": "agent", "params": {"model": model, **params}},
    }


def test_bad_inputs_get_clear_errors(world, trained, tmp_path) -> None:
    folder, card = trained
    model = strategy_spec(folder)["params"]["model"]
    names = card["domains"]
    with pytest.raises(TrajectoryError, match="no trajectories"):
        train_on([], FAST)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrajectoryError, match="no trajectories"):
        train(trajectories=tmp_path / "empty", out=tmp_path / "x", config=FAST, progress=False)
    trajs = load_trajectories(world["root"] / "out")
    other = Trajectory(
        "other", tuple(f"z{i}" for i in range(len(names))), 2, trajs[0].actions, trajs[0].losses
    )
    with pytest.raises(TrajectoryError, match="one agent learns one domain space"):
        transitions([trajs[0], other], history=2, horizon=3)
    bad = trajs[0].to_dict()
    bad["losses"][0][0] = float("nan")
    with pytest.raises(TrajectoryError, match="validation losses must be finite"):
        Trajectory.from_dict(bad, "t.json")
    # domain mismatch at the job: another count, other names, or no model at all
    with pytest.raises(SpecError, match=f"trained on {len(names)} domains"):
        JobSpec.from_dict(_spec(model, names[:-1]))
    strangers = [f"new{i}" for i in range(len(names))]
    with pytest.raises(SpecError, match="match: position"):
        JobSpec.from_dict(_spec(model, strangers))
    assert JobSpec.from_dict(_spec(model, strangers, match="position")).strategy.name == "agent"
    with pytest.raises(SpecError, match="strategy.params.model"):
        JobSpec.from_dict(_spec("", names))
    with pytest.raises(SpecError, match="not valid base64"):
        JobSpec.from_dict(_spec("***", names))
    with pytest.raises(SpecError, match="strategy.params.match"):
        JobSpec.from_dict(_spec(model, names, match="fuzzy"))
    # a card from another training run
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / WEIGHTS).write_bytes((folder / WEIGHTS).read_bytes())
    (copy / CARD).write_text(json.dumps({**card, "domains": list(reversed(names))}))
    with pytest.raises(AgentFileError, match="does not match"):
        load_agent(copy)
    with pytest.raises(AgentFileError, match="not found"):
        load_agent(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="trajectories must be an integer"):
        CollectConfig(trajectories=0).validate()
    for ignore in ("noise-0", ("",), (1,)):
        with pytest.raises(ValueError, match="reward_ignore must be a list of domain names"):
            TrainConfig(reward_ignore=ignore).validate()
    with pytest.raises(TrajectoryError, match="reward_ignore names 'nope'"):
        train_on(trajs, dataclasses.replace(FAST, reward_ignore=("nope",)))


def test_command_line_trains_and_writes_a_spec(world, trained, tmp_path) -> None:
    from click.testing import CliRunner

    from mixer.cli import main

    out = tmp_path / "cli-agent"
    run = CliRunner().invoke(
        main,
        [
            "agent",
            "train",
            "--trajectories",
            str(world["root"] / "out"),
            "--out",
            str(out),
            "--steps",
            "20",
            "--bc-steps",
            "10",
            "--hidden",
            "16",
            "--batch",
            "16",
            "--json",
        ],
        catch_exceptions=False,
    )
    assert run.exit_code == 0, run.output
    card = json.loads(run.output.strip().splitlines()[-1])
    assert (out / "agent.safetensors").is_file() and card["domains"] == trained[1]["domains"]
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"name": "agent-cli", "domains": [{"name": d} for d in card["domains"]]}))
    spec_out = tmp_path / "job-agent.yaml"
    run = CliRunner().invoke(
        main, ["agent", "spec", str(job), "--agent", str(out), "-o", str(spec_out)], catch_exceptions=False
    )
    assert run.exit_code == 0, run.output
    assert JobSpec.from_yaml(spec_out.read_text()).strategy.name == "agent"
    # by reference: the spec holds the path and sha256 only; loading it puts the file's bytes in
    by_ref = tmp_path / "job-ref.yaml"
    run = CliRunner().invoke(
        main,
        ["agent", "spec", str(job), "--agent", str(out), "-o", str(by_ref), "--by-reference"],
        catch_exceptions=False,
    )
    assert run.exit_code == 0, run.output
    params = yaml.safe_load(by_ref.read_text())["strategy"]["params"]
    assert "model" not in params and params["sha256"] == load_agent(out).sha256
    loaded = JobSpec.from_yaml(resolve_spec_text(by_ref.read_text(), tmp_path))
    assert base64.b64decode(loaded.strategy.params["model"]) == (out / ACTOR).read_bytes()
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(yaml.safe_dump({"name": "agent-bad", "domains": [{"name": "x"}, {"name": "y"}]}))
    bad = CliRunner().invoke(main, ["agent", "spec", str(wrong), "--agent", str(out)])
    assert bad.exit_code == 1 and "Error:" in bad.output and "domain" in bad.output
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = CliRunner().invoke(
        main, ["agent", "train", "--trajectories", str(empty), "--out", str(tmp_path / "x")]
    )
    assert bad.exit_code == 1 and "Error:" in bad.output


def test_bench_quality_runs_the_agent_next_to_uniform(world, trained, tmp_path) -> None:
    from mixer.bench.quality import run_quality

    folder, _ = trained
    cfg = dataclasses.replace(PROXY, steps=12, update_every=3)
    result = run_quality(
        corpus=world["root"] / "corpus",
        strategies=["agent"],
        seeds=1,
        cfg=cfg,
        out=tmp_path / "q",
        cache=world["root"] / "out" / "prepared",
        progress=False,
        agent=strategy_spec(folder)["params"],
    )
    runs = {r["strategy"]: r for r in result["runs"]}
    assert runs["uniform"]["status"] == "ok" and runs["agent"]["status"] == "ok", runs
    assert runs["agent"]["versions"] > 1  # the agent re-weighted at its validations
    with pytest.raises(ValueError, match="--agent PATH"):
        run_quality(
            corpus=world["root"] / "corpus",
            strategies=["agent"],
            seeds=1,
            cfg=cfg,
            out=tmp_path / "q2",
            progress=False,
        )


def test_collect_takes_the_quality_benchmarks_noise_domains(tmp_path) -> None:
    """With noise_domains, collect's domain space is `mixer bench quality --noise-domains N`'s: the
    corpus's domains, then noise-0..., the same files, so an agent trained on it runs there by name."""
    from mixer.bench.corpus import prepare_corpora

    write_synthetic_corpus(tmp_path / "corpus", seed=0, docs_per_domain=20)
    folder = tmp_path / "out" / "trajectories"
    folder.mkdir(parents=True)
    (folder / "traj-00000.json").write_text("{}")  # finished: nothing left to run, no Ray started
    cfg = CollectConfig(trajectories=1, segments=2, segment_steps=1, proxy=PROXY)
    kw = {"out": tmp_path / "out", "config": cfg, "corpus": tmp_path / "corpus", "progress": False}
    got = collect(noise_domains=1, **kw)
    bench = prepare_corpora(tmp_path / "corpus", tmp_path / "bench", tmp_path / "cache", 1, False, False)
    assert got["domains"] == list(bench.prefixes) and got["domains"][-1] == "noise-0", got
    assert got["skipped"] == 1 and got["ran"] == 0 and not got["failed"], got
    for split in ("train", "val"):
        ours = tmp_path / "out" / "noise-corpus" / "noise-0" / f"{split}.jsonl"
        assert (
            ours.read_bytes()
            == (tmp_path / "bench" / "noise-corpus" / "noise-0" / f"{split}.jsonl").read_bytes()
        )
    for bad in (-1, 65, True, 1.5):
        with pytest.raises(ValueError, match="noise_domains"):
            collect(noise_domains=bad, **kw)
