"""GPU check: a ~125M GPT on one GPU, attached and detached in the same run, and the step-time ratio.

    python -m mixer.bench.gpu_check [--steps 300] [--workdir DIR]      (or: bash mixer/megatron/gpu_check.sh)

Writes the synthetic corpus (large enough for 2048-token samples), prepares it, starts `mixer
serve` on SQLite, creates an ODM job and runs the pretraining script with 12 layers, hidden 768,
12 heads, sequence 2048, global batch 4 and the vocabulary padded to GPT-2's 50,304 (~124M
parameters) on megatron-core's machinery (mixer.megatron.core_train: the schedule with two
micro-batches, DDP, the distributed optimizer with fp32 master weights, bf16).
`--compare-attached 25` alternates blocks of 25 steps without the mixer's loss wrapper (no
statistics, no reports) and with it; the first step of each block is left out of the medians. A
checkpoint half-way is resumed to the end, and its last losses are compared with the run's. Budget: corpus and start-up about a minute, 300 steps of ~0.1 s on an
H100, the final validation: well inside 8 minutes. The last line is a JSON summary.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
import yaml


def half_way(record: dict) -> str:
    """The checkpoint folder written half-way (the megatron trainer and the plain loop name them differently)."""
    step = record["final_step"] // 2
    return f"iter_{step:07d}" if record.get("trainer") == "megatron" else f"step_{step:08d}"


@click.command()
@click.option("--steps", default=300, show_default=True, type=click.IntRange(min=20))
@click.option(
    "--block",
    default=25,
    show_default=True,
    type=click.IntRange(min=5),
    help="steps per attached / detached block",
)
@click.option("--workdir", default=None, type=click.Path(file_okay=False, path_type=Path))
@click.option("--device", default="cuda", show_default=True)
@click.option("--layers", default=12, show_default=True)
@click.option("--hidden", default=768, show_default=True)
@click.option("--heads", default=12, show_default=True)
@click.option("--seq-length", default=2048, show_default=True)
@click.option("--micro-batch", default=4, show_default=True, help="the global batch (two micro-batches)")
def main(
    steps: int,
    block: int,
    workdir: Path | None,
    device: str,
    layers: int,
    hidden: int,
    heads: int,
    seq_length: int,
    micro_batch: int,
) -> None:
    """Run the check and print the attached / detached step-time ratio."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise click.ClickException("no CUDA device: this check needs a GPU")
    from mixer.bench.launch import ServerProcess
    from mixer.megatron.pretrain import PretrainConfig, run_pretrain

    tmp = tempfile.TemporaryDirectory(prefix="mixer-gpu-check-") if workdir is None else None
    root = Path(tmp.name) if tmp else workdir
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    spec_path = _prepare(root)
    server = ServerProcess(str(root / "mixer.db"), root).start()
    click.echo(f"corpus, data and service ready in {time.perf_counter() - t0:.0f}s; training {steps} steps")
    model = {
        "spec": spec_path,
        "steps": steps,
        "global_batch_size": micro_batch,
        "micro_batch_size": max(1, micro_batch // 2),
        "seq_length": seq_length,
        "layers": layers,
        "hidden": hidden,
        "heads": heads,
        "vocab_size": 50304,
        "lr": 3e-4,
        "min_lr": 3e-5,
        "device": device,
        "progress": False,
    }
    try:
        record = run_pretrain(
            PretrainConfig.of(
                **model,
                mixer=server.address,
                eval_samples=4,
                compare_attached=block,
                save=root / "ckpt",
                save_interval=steps // 2,
            )
        )
        # Resume: the second half again from the checkpoint taken half-way, through the same schedule.
        resumed = run_pretrain(PretrainConfig.of(**model, load=root / "ckpt" / half_way(record)))
    finally:
        server.terminate()
        if tmp is not None:
            tmp.cleanup()
    summary = _summary(record, resumed, device=device, steps=steps, block=block, t0=t0)
    click.echo(
        f"median step: attached {summary['median_step_attached_ms']:.2f} ms, detached "
        f"{summary['median_step_detached_ms']:.2f} ms, ratio {summary['ratio']:.4f}; "
        f"loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f}; "
        f"resume from step {steps // 2} matches: {summary['resume_matches']}"
    )
    click.echo(json.dumps(summary))
    sys.stdout.flush()


def _prepare(root: Path) -> Path:
    """The synthetic corpus, its Megatron data and the job spec under `root`; the spec's path."""
    from mixer.megatron.corpus import write_synthetic_corpus
    from mixer.megatron.data import prepare_corpus

    write_synthetic_corpus(root / "corpus", seed=0, docs_per_domain=3000)
    prefixes = prepare_corpus(root / "corpus", root / "data", progress=False)
    spec = {
        "name": f"gpu-check-{int(time.time())}",
        "domains": [{"name": d, "prefix": p["train"]} for d, p in prefixes.items()],
        "strategy": {"name": "odm"},
        "cadence": {"update_every": 10, "min_weight": 0.02},
    }
    spec_path = root / "job.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return spec_path


def _summary(
    record: dict[str, Any], resumed: dict[str, Any], *, device: str, steps: int, block: int, t0: float
) -> dict[str, Any]:
    import torch

    attached, detached = record["step_time_attached_s"], record["step_time_detached_s"]
    summary = {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else device,
        "steps": steps,
        "block": block,
        "median_step_attached_ms": 1000 * attached,
        "median_step_detached_ms": 1000 * detached,
        "ratio": attached / detached,
        "first_loss": record["losses"][0],
        "last_loss": record["losses"][-1],
        "trainer": record.get("trainer", "plain"),
        "resumed_from": steps // 2,
        # Detached blocks report nothing, so the versions (and the data) can differ after a resume
        # only through the service's timing; the losses must agree closely.
        "resumed_last_losses": resumed["losses"][-5:],
        "resume_matches": bool(np.allclose(resumed["losses"][-5:], record["losses"][-5:], rtol=0.05)),
        "all_reports_acknowledged": record["all_reports_acknowledged"],
        "total_s": time.perf_counter() - t0,
    }
    return summary


if __name__ == "__main__":
    main()
