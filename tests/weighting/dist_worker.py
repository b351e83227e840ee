"""Runs in each process of the 2-rank gloo group of test_distributed_weighting (not a test module)."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from mixer.weighting import dwm, loss_based, topic


def batch() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    n = 16
    return {
        "losses": rng.uniform(1.0, 8.0, n),
        "topics": np.stack(
            [rng.integers(0, 5, n), np.where(rng.random(n) < 0.5, -1, rng.integers(0, 5, n))], 1
        ),
        "features": rng.normal(size=(n, 6)),
    }


TOPIC_WEIGHTS = [0.1, 0.4, 0.2, 0.0, 0.3]


def run(rank: int, world: int, init_file: str, out_dir: str) -> None:
    # Forked from a parent that may have used OpenMP: one thread keeps the child off that pool.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        b = batch()
        n = len(b["losses"]) // world
        part = slice(rank * n, (rank + 1) * n)
        params = dwm.init_params(6, 8, seed=3)
        params["w2"] = np.linspace(-1, 1, 8, dtype=np.float32)
        out = {
            "loss": loss_based.loss_weights(torch.tensor(b["losses"][part]), "linupper", 1.0, 0.4).numpy(),
            "topic": topic.sample_weights(torch.tensor(b["topics"][part]), TOPIC_WEIGHTS).numpy(),
            "dwm": dwm.evaluate(params, torch.tensor(b["features"][part], dtype=torch.float32)).numpy(),
        }
        bad = torch.tensor(b["losses"][part])
        if rank == 1:
            bad[0] = float("nan")
        try:
            loss_based.loss_weights(bad)
            out["nan_raised"] = np.array(False)
        except ValueError:
            out["nan_raised"] = np.array(True)
        feats = torch.tensor(b["features"][part], dtype=torch.float32)
        if rank == 0:
            feats[1, 2] = float("inf")
        try:
            dwm.evaluate(params, feats)
            out["dwm_nan_raised"] = np.array(False)
        except ValueError:
            out["dwm_nan_raised"] = np.array(True)
        np.savez(f"{out_dir}/rank{rank}.npz", **out)
    finally:
        dist.destroy_process_group()
