"""The agent named by content hash, through a real service (no Ray, no training): a spec names the
agent's file by path and sha256, loading the spec puts the verified bytes in it, the job runs, a
restarted server continues it exactly, and a replay on a copy of the database (the file gone)
re-derives every version bit for bit; a file that does not match, a corrupt file or one for other
domains is refused and changes nothing. And collected trajectories as tables (`mixer agent export`)."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import urllib.request

import grpc
import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from mixer import replay as rp
from mixer.agent.policy import fresh_model
from mixer.agent.trajectory import Trajectory, TrajectoryError
from mixer.bench.launch import ServerProcess
from mixer.cli import main
from mixer.client import MixerClient
from mixer.replay import verify
from mixer.signals import Report
from mixer.spec import JobSpec, SpecError
from mixer.store import Store
from mixer.transfer import TransferError, resolve_agent, resolve_spec_text

DOMAINS = ["a", "b", "c"]
STEPS = 12


def _agent_file(folder, domains=DOMAINS, seed=1) -> tuple[str, str]:
    """An untrained actor of the trained layout written as folder/actor.safetensors: (name, sha256)."""
    data = base64.b64decode(fresh_model(domains, history=2, horizon=STEPS, seed=seed))
    (folder / "actor.safetensors").write_bytes(data)
    return "actor.safetensors", hashlib.sha256(data).hexdigest()


def _spec(name: str, path: str, sha256: str, domains=DOMAINS) -> dict:
    return {
        "name": name,
        "domains": list(domains),
        "strategy": {"name": "agent", "params": {"path": path, "sha256": sha256}},
        "cadence": {"update_every": 1, "min_weight": 0.01},
        "seed": 5,
    }


def _report(step: int) -> Report:
    loss = np.array([3.0, 3.4, 4.1]) + np.array([1.0, 0.5, 0.2]) * (step + 1.0) ** -0.5
    return Report(step=step, source="w0", val_loss=loss)


def _create(address: str, spec_path) -> tuple[int, str]:
    run = CliRunner().invoke(main, ["job", "create", str(spec_path), "--address", address])
    return run.exit_code, run.output


def test_loading_a_spec_puts_the_named_agent_in_it(tmp_path) -> None:
    name, sha = _agent_file(tmp_path)
    text = yaml.safe_dump(_spec("ref", name, sha))
    spec = JobSpec.from_yaml(resolve_spec_text(text, tmp_path))
    params = spec.strategy.params
    assert base64.b64decode(params["model"]) == (tmp_path / name).read_bytes()
    assert params["sha256"] == sha and params["path"] == name
    # JSON text is read the same way, through the spec's own loader
    again = JobSpec.from_yaml(resolve_spec_text(json.dumps(_spec("ref", name, sha)), tmp_path))
    assert again.strategy.params["model"] == params["model"]
    # a spec that names no file, or already carries the model, is left as it is
    assert resolve_spec_text("name: x\ndomains: [a, b]\n", tmp_path) == "name: x\ndomains: [a, b]\n"
    inline = {**_spec("ref", name, sha), "strategy": {"name": "agent", "params": dict(params)}}
    assert resolve_agent(inline, tmp_path) is inline
    # YAML aliases are refused by the spec's loader, so the resolver leaves them to the parser
    bomb = "a: &x [agent]\nb: *x\n"
    assert resolve_spec_text(bomb, tmp_path) == bomb
    with pytest.raises(SpecError, match="anchors and aliases"):
        JobSpec.from_yaml(bomb)


def test_bad_agent_references_are_refused_clearly(tmp_path) -> None:
    name, sha = _agent_file(tmp_path)
    good = _spec("bad", name, sha)
    data = (tmp_path / name).read_bytes()
    (tmp_path / "changed.safetensors").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(TransferError, match="has sha256 .* but strategy.params.sha256 names"):
        resolve_agent(_spec("bad", "changed.safetensors", sha), tmp_path)
    with pytest.raises(TransferError, match="no such file"):
        resolve_agent(_spec("bad", "missing.safetensors", sha), tmp_path)
    with pytest.raises(TransferError, match="64 lowercase hex digits"):
        resolve_agent(_spec("bad", name, sha.upper()), tmp_path)
    (tmp_path / "huge.safetensors").write_bytes(b"\0" * (600 << 10))
    with pytest.raises(TransferError, match="at most"):
        resolve_agent(_spec("bad", "huge.safetensors", sha), tmp_path)
    # the strategy (pure, no files) checks the bytes it is given against the name
    with pytest.raises(SpecError, match="strategy.params.model.*is empty: the spec names the agent file"):
        JobSpec.from_dict(good)
    resolved = resolve_agent(good, tmp_path)
    wrong = json.loads(json.dumps(resolved))
    wrong["strategy"]["params"]["sha256"] = "0" * 64
    with pytest.raises(SpecError, match="strategy.params.sha256.*not the agent the spec names"):
        JobSpec.from_dict(wrong)
    corrupt = data[:40] + b"\xff" * 8 + data[48:]
    (tmp_path / "corrupt.safetensors").write_bytes(corrupt)
    bad = resolve_agent(_spec("bad", "corrupt.safetensors", hashlib.sha256(corrupt).hexdigest()), tmp_path)
    with pytest.raises(SpecError, match="not a safetensors agent"):
        JobSpec.from_dict(bad)
    (tmp_path / "other").mkdir()
    other_name, other_sha = _agent_file(tmp_path / "other", domains=["x", "y"], seed=2)
    other = resolve_agent(_spec("bad", f"other/{other_name}", other_sha), tmp_path)
    with pytest.raises(SpecError, match="trained on 2 domains"):
        JobSpec.from_dict(other)


def test_the_service_refuses_a_bad_agent_and_stores_nothing(server, tmp_path) -> None:
    name, sha = _agent_file(tmp_path)
    (tmp_path / name).write_bytes((tmp_path / name).read_bytes()[:-2] + b"  ")  # changed after hashing
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(yaml.safe_dump(_spec("refused", name, sha)))
    code, out = _create(server.address, spec_path)
    assert code == 1 and "has sha256" in out and "not the agent the spec names" in out, out
    inline = resolve_agent(
        _spec("refused", name, hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()), tmp_path
    )
    inline["strategy"]["params"]["sha256"] = sha  # the bytes are not the agent this names
    with MixerClient(server.address) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.create_job(json.dumps(inline))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "strategy.params.sha256" in e.value.details()
        assert [j.name for j in c.list_jobs()] == []


def test_a_job_named_by_hash_restarts_and_replays_bit_for_bit_without_the_file(tmp_path) -> None:
    name, sha = _agent_file(tmp_path)
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(yaml.safe_dump(_spec("by-hash", name, sha)))
    db = str(tmp_path / "mixer.db")
    server = ServerProcess(db, tmp_path).start()
    try:
        code, out = _create(server.address, spec_path)
        assert code == 0, out
        with MixerClient(server.address) as c:
            for step in range(STEPS // 2):
                c.report("by-hash", _report(step))
        server.kill()  # no graceful shutdown: the newest snapshot and the log after it
        server = ServerProcess(db, tmp_path).start()
        with MixerClient(server.address) as c:
            for step in range(STEPS // 2, STEPS):
                c.report("by-hash", _report(step))
            versions = c.list_versions("by-hash")
            stored = json.loads(c.get_job("by-hash").spec_json)
        # on the page's API, as any job: its versions with the agent's step in their parameters
        url = f"http://127.0.0.1:{server.http_port}/api/jobs/by-hash/versions/{STEPS}"
        page = json.loads(urllib.request.urlopen(url, timeout=10).read())
    finally:
        server.kill()
    assert stored["strategy"]["params"]["sha256"] == sha
    assert page["params"]["agent_step"] == STEPS, page
    assert [v.params["agent_step"] for v in versions[1:]] == list(range(1, STEPS + 1))
    # another machine: a copy of the database, and no agent file anywhere
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for suffix in ("", "-wal", "-shm"):
        if (tmp_path / f"mixer.db{suffix}").exists():
            shutil.copy(tmp_path / f"mixer.db{suffix}", elsewhere / f"mixer.db{suffix}")
    (tmp_path / name).unlink()
    store = Store(str(elsewhere / "mixer.db"))
    try:
        result = verify(store, "by-hash")
    finally:
        store.close()
    assert result.ok and result.versions_checked == len(versions) == STEPS + 1, result.to_dict()
    run = CliRunner().invoke(
        main, ["replay", "by-hash", "--verify", "--db", str(elsewhere / "mixer.db"), "--json"]
    )
    assert run.exit_code == 0 and json.loads(run.output.strip().splitlines()[-1])["ok"], run.output
    # the agent's job is an ordinary record: exported to Parquet and plotted with its validation losses
    out = tmp_path / "v.parquet"
    run = CliRunner().invoke(main, ["export", "by-hash", "-o", str(out), "--db", str(elsewhere / "mixer.db")])
    assert run.exit_code == 0, run.output
    table = pq.read_table(out)
    assert table.column("version").to_pylist() == [v.version for v in versions]
    assert np.array_equal(table.column("weight/b").to_numpy(), [v.weights[1] for v in versions])
    png = tmp_path / "p.png"
    run = CliRunner().invoke(
        main, ["plot", "by-hash", "-o", str(png), "--db", str(elsewhere / "mixer.db"), "--json"]
    )
    assert run.exit_code == 0, run.output
    drawn = json.loads(run.output.strip().splitlines()[-1])["jobs"][0]
    assert drawn["val_reports"] == STEPS and drawn["versions"] == STEPS + 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_counterfactual_replay_reads_the_agent_it_names(server_factory, tmp_path, monkeypatch) -> None:
    """`mixer replay JOB --strategy agent --set path=FILE --set sha256=HASH`: the file is read and
    checked as when a spec file is loaded, and the versions are those of that loaded spec."""
    db = str(tmp_path / "mixer.db")
    srv = server_factory(db)
    source = {**_spec("src", "", ""), "strategy": {"name": "static"}}
    with MixerClient(srv.address) as c:
        c.create_job(source)
        for step in range(STEPS):
            c.report("src", _report(step))
    name, sha = _agent_file(tmp_path)
    (tmp_path / "other").mkdir()
    other, other_sha = _agent_file(tmp_path / "other", seed=2)
    # --set path is relative to the working directory, as a spec file's path is to its folder
    monkeypatch.chdir(tmp_path)
    cli = CliRunner()

    def replay(job: str, *args: str) -> tuple[int, str]:
        run = cli.invoke(main, ["replay", job, *args, "--db", db, "--json"])
        return run.exit_code, run.output

    store = Store(db)
    try:
        log = rp.load_log(store, "src")[2]
        for job, path, digest, as_name, strategy in (
            ("src", name, sha, "cf", ["--strategy", "agent"]),
            ("cf", f"other/{other}", other_sha, "cf2", []),  # another agent over an agent job's spec
        ):
            code, out = replay(
                job, *strategy, "--set", f"path={path}", "--set", f"sha256={digest}", "--as", as_name
            )
            assert code == 0, out
            doc = json.loads(out.strip().splitlines()[-1])
            # the reference: the source's spec with the agent's reference in it, loaded from a file
            ref = {
                **source,
                "name": as_name,
                "strategy": {"name": "agent", "params": {"path": path, "sha256": digest}},
            }
            ref_file = tmp_path / f"{as_name}.yaml"
            ref_file.write_text(yaml.safe_dump(ref))
            want = rp.replay(
                JobSpec.from_yaml(resolve_spec_text(ref_file.read_text(), tmp_path)), log
            ).versions
            stored = [v for v, _ in store.versions(store.get_job(as_name).id)]
            assert doc["versions"] == len(stored) == len(want) == STEPS + 1, doc
            assert all(a.same_as(b) for a, b in zip(stored, want))
            assert [v.params["agent_step"] for v in stored[1:]] == list(range(1, STEPS + 1))
            params = JobSpec.from_json(store.get_job(as_name).spec_json).strategy.params
            assert (
                params["sha256"] == digest
                and base64.b64decode(params["model"]) == (tmp_path / path).read_bytes()
            )
        assert not np.array_equal(
            stored[-1].weights, [v for v, _ in store.versions(store.get_job("cf").id)][-1].weights
        )
        # a file that is missing or not the agent its sha256 names: the --set is named, nothing is stored
        for sets, said in (
            ([f"path={name}", f"sha256={other_sha}"], ["--set path", "but strategy.params.sha256 names"]),
            (["path=gone.safetensors", f"sha256={sha}"], ["--set path", "no such file"]),
            ([f"path={name}", "sha256=abc"], ["--set sha256", "64 lowercase hex digits"]),
        ):
            code, out = replay(
                "src", "--strategy", "agent", *(a for s in sets for a in ("--set", s)), "--as", "refused"
            )
            assert code == 1 and all(w in out for w in said), out
            assert store.get_job("refused") is None
        # the agent without a file reference is still refused by the strategy, naming what it needs
        code, out = replay("src", "--strategy", "agent")
        assert code == 1 and "strategy.params.model" in out, out
    finally:
        store.close()


def _trajectories(folder, domains=DOMAINS, n=2, T=3) -> list[Trajectory]:
    rng = np.random.default_rng(0)
    (folder / "trajectories").mkdir(parents=True)
    out = []
    for i in range(n):
        actions = rng.dirichlet(np.ones(len(domains)), T)
        losses = 4.0 - np.cumsum(rng.uniform(0, 0.2, (T, len(domains))), axis=0)
        t = Trajectory(f"agent-x-traj-{i:05d}", tuple(domains), 2, actions, losses)
        nominal = rng.dirichlet(np.ones(len(domains)), T)
        doc = t.to_dict(index=i, seed=i, nominal=nominal.tolist())
        (folder / "trajectories" / f"traj-{i:05d}.json").write_text(json.dumps(doc))
        out.append((t, nominal))
    return out


def test_collected_trajectories_export_to_parquet_and_csv(tmp_path) -> None:
    made = _trajectories(tmp_path / "run")
    for fmt, out in (("parquet", tmp_path / "t.parquet"), ("csv", tmp_path / "t.csv")):
        run = CliRunner().invoke(main, ["agent", "export", str(tmp_path / "run"), "-o", str(out), "--json"])
        assert run.exit_code == 0, run.output
        summary = json.loads(run.output.strip().splitlines()[-1])
        assert summary["format"] == fmt and summary["rows"] == 6 and summary["trajectories"] == 2
        if fmt == "parquet":
            table = pq.read_table(out)
            meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
        else:
            table = pacsv.read_csv(out)
            meta = json.loads((tmp_path / "t.csv.meta.json").read_text())
        assert meta["mixer.what"] == "trajectories" and json.loads(meta["mixer.domains"]) == DOMAINS
        assert table.column("segment").to_pylist() == [1, 2, 3, 1, 2, 3]
        assert table.column("step").to_pylist() == [2, 4, 6, 2, 4, 6]
        assert table.column("trajectory").to_pylist() == [0, 0, 0, 1, 1, 1]
        for k, d in enumerate(DOMAINS):
            want_a = np.concatenate([t.actions[:, k] for t, _ in made])
            want_l = np.concatenate([t.losses[:, k] for t, _ in made])
            want_n = np.concatenate([n[:, k] for _, n in made])
            # Parquet keeps every bit; CSV text round-trips float64 exactly too (shortest repr)
            assert np.array_equal(table.column(f"action/{d}").to_numpy(), want_a)
            assert np.array_equal(table.column(f"val_loss/{d}").to_numpy(), want_l)
            assert np.array_equal(table.column(f"nominal/{d}").to_numpy(), want_n)


def test_trajectory_export_refuses_bad_folders(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    run = CliRunner().invoke(
        main, ["agent", "export", str(tmp_path / "empty"), "-o", str(tmp_path / "x.parquet")]
    )
    assert run.exit_code == 1 and "no trajectories" in run.output, run.output
    assert not (tmp_path / "x.parquet").exists()
    _trajectories(tmp_path / "mixed")
    _trajectories(tmp_path / "other", domains=["x", "y", "z"], n=1)
    shutil.copy(
        tmp_path / "other/trajectories/traj-00000.json", tmp_path / "mixed/trajectories/traj-00009.json"
    )
    from mixer.agent.records import trajectories_table

    with pytest.raises(TrajectoryError, match="one table holds one domain space"):
        trajectories_table(tmp_path / "mixed")
    (tmp_path / "mixed/trajectories/traj-00009.json").write_text("{not json")
    run = CliRunner().invoke(
        main, ["agent", "export", str(tmp_path / "mixed"), "-o", str(tmp_path / "y.parquet")]
    )
    assert run.exit_code == 1 and "unreadable" in run.output, run.output
    assert not (tmp_path / "y.parquet").exists()
