"""The weighting benchmark runs and reports what the CLI prints."""

from __future__ import annotations

import torch

from mixer.bench.weighting import TARGETS_MS, run_bench


def test_bench_runs_and_reports_medians() -> None:
    threads = torch.get_num_threads()
    out = run_bench(batch=256, repeats=3, threads=1)
    assert torch.get_num_threads() == threads
    assert set(TARGETS_MS) <= set(out) and out["batch"] == 256 and out["threads"] == 1
    assert all(v > 0 for v in out.values())
