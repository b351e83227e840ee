"""`mixer demo`: the whole loop on one machine in a couple of minutes.

A deterministic synthetic corpus (learnable, pure-noise and heavily duplicated domains) is
prepared as Megatron indexed datasets; an embedded mixer service starts on a SQLite file; a
tiny Megatron-core GPTModel trains on the CPU, attached to it through a session; the weight
versions the service made are printed as a table.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from mixer.client import MixerClient


def _demo_spec(job: str, strategy: str, domains: list[str], prefixes: dict[str, dict[str, str]]) -> dict[str, Any]:
    return {
        "name": job,
        "domains": [{"name": d, "prefix": prefixes[d]["train"]} for d in domains],
        "strategy": {"name": strategy},
        "cadence": {"update_every": 10, "min_weight": 0.02},
        "unit": "samples",
    }


def run_demo(
    *,
    address: str | None = None,
    job: str = "demo",
    steps: int = 1500,
    strategy: str = "odm",
    workdir: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    from mixer.megatron.attach import ServiceAttachment
    from mixer.megatron.corpus import write_synthetic_corpus
    from mixer.megatron.data import build_domain_datasets, prepare_corpus
    from mixer.megatron.model import ModelConfig
    from mixer.megatron.sampler import MixtureSampler
    from mixer.megatron.train import TrainConfig, train
    from mixer.server.launch import ServerProcess
    from mixer.spec import JobSpec

    say = print if progress else (lambda *a, **k: None)
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="mixer-demo-")
        workdir = Path(tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    server = None
    try:
        domains = write_synthetic_corpus(workdir / "corpus", seed=0)
        say(f"corpus: {', '.join(domains)} in {workdir / 'corpus'}")
        prefixes = prepare_corpus(workdir / "corpus", workdir / "data", progress=progress)
        if address is None:
            server = ServerProcess(str(workdir / "mixer.db"), workdir).start()
            address = server.address
            say(f"embedded mixer service on {address} (SQLite {workdir / 'mixer.db'}, metrics on :{server.http_port}/metrics)")
        spec = JobSpec.from_dict(_demo_spec(job, strategy, domains, prefixes))
        with MixerClient(address) as client:
            info, created = client.create_job(spec)
            if not created:
                say(f"job {job!r} exists with the same spec; attaching to it")
            v0 = client.get_weights(job)

        cfg = TrainConfig(steps=steps, global_batch_size=16, lr=2e-3, seq_length=64, model=ModelConfig(seq_length=64), eval_every=0, log_every=50)
        cache = workdir / "cache" / f"{time.time_ns()}"
        train_sets = build_domain_datasets([prefixes[d]["train"] for d in domains], cfg.seq_length, 0, None, cache)
        val_sets = build_domain_datasets([prefixes[d]["val"] for d in domains], cfg.seq_length, 0, None, cache)
        sampler = MixtureSampler(
            len(domains),
            cfg.global_batch_size,
            list(v0.weights),
            fingerprint=spec.fingerprint(),
            dataset_lengths=[len(d) for d in train_sets],
            version=v0.version,
        )
        attachment = ServiceAttachment(address, job, "rank0")
        t0 = time.perf_counter()
        result = train(cfg, train_sets, val_sets, sampler, attachment=attachment, progress=progress)
        elapsed = time.perf_counter() - t0
        delivered = attachment.close(timeout=60)
        with MixerClient(address) as client:
            versions = client.list_versions(job)
            info = client.get_job(job)
        rows = [{"version": v.version, "effective_step": v.effective_step, "weights": list(v.weights)} for v in versions]
        from mixer.cli import weights_table

        shown = rows if len(rows) <= 24 else rows[:: max(1, len(rows) // 20)] + [rows[-1]]
        say("")
        say(f"domain weights per version ({len(rows)} versions, {strategy}; every {max(1, len(rows) // 20)}th shown):" if len(rows) > 24 else f"domain weights per version ({strategy}):")
        say(weights_table(domains, shown))
        final_val = result.val_history[-1][1] if result.val_history else np.full(len(domains), np.nan)
        say("")
        say("final validation loss per domain (nats/byte): " + ", ".join(f"{d} {x:.3f}" for d, x in zip(domains, final_val)))
        moved = float(np.max(np.abs(np.array(rows[-1]["weights"]) - np.array(rows[0]["weights"]))))
        say(f"{steps} steps in {elapsed:.1f}s ({1000 * result.step_time_s:.1f} ms/step), {info.report_count} reports logged, "
            f"largest weight change {moved:.3f}; all reports acknowledged: {delivered}")
        return {
            "job": job,
            "strategy": strategy,
            "domains": domains,
            "steps": steps,
            "seconds": elapsed,
            "step_ms": 1000 * result.step_time_s,
            "reports_logged": info.report_count,
            "all_acknowledged": delivered,
            "versions": rows,
            "final_val_loss": final_val.tolist(),
            "max_weight_change": moved,
            "address": address,
        }
    finally:
        if server is not None:
            server.terminate()
        if tmp is not None:
            tmp.cleanup()
