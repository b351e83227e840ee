"""Runs in each process of the 2-rank gloo group of test_token_weighting (not a test module)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mixer.megatron.loss import compute_loss
from mixer.weighting import parse_weighting_params
from mixer.weighting.token import token_weights

DATA = json.loads((Path(__file__).parent / "data" / "token_cases.json").read_text())


def run(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        b = len(DATA["labels"]) // world
        part = slice(rank * b, (rank + 1) * b)
        logits = torch.tensor(DATA["logits"], dtype=torch.float64)[part]
        labels = torch.tensor(DATA["labels"])[part]
        mask = torch.tensor(DATA["loss_mask"], dtype=torch.float64)
        ref = torch.tensor(DATA["reference_token_loss"], dtype=torch.float64)[part]
        domain = torch.tensor(DATA["dataset_id"])[part]
        # compute_loss's data-parallel normalizer: the global token count / ranks.
        norm = mask.sum() / world
        mask = mask[part]
        out = {}
        for i, case in enumerate(DATA["cases"]):
            per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
            params = parse_weighting_params(case["method"], case["params"])
            w = token_weights(case["method"], params, 0, per_token, mask, ref)
            loss, _ = compute_loss(
                per_token, mask, domain, DATA["num_domains"], normalizer=norm, token_weights=w
            )
            out[f"w{i}"] = w.numpy()
            out[f"loss{i}"] = loss.detach().numpy()
        np.savez(Path(out_dir) / f"rank{rank}.npz", **out)
    finally:
        dist.destroy_process_group()
