"""`mixer bench select` on the stored tiny inputs: both sides time the same files and report sane figures."""

from __future__ import annotations

import pytest

from mixer.bench.select import format_table, run_select_bench
from tests.selection.conftest import DATA, domains, read_texts


def test_bench_times_ours_and_the_package_on_the_same_text():
    target = domains()[-1]
    result = run_select_bench(DATA / "raw", target, min_words=10, num_samples=5, progress=False)
    texts = [t for d in domains() for t in read_texts(DATA / "raw" / d / "train.jsonl")]
    assert result["raw_docs"] == len(texts)
    assert result["raw_text_mb"] == pytest.approx(sum(len(t.encode()) for t in texts) / 1e6)
    assert result["target"].endswith(f"{target}/val.jsonl")
    for side in ("ours", "package"):
        s = result[side]
        assert (
            s["fit_cpu_s"] > 0 and s["score_cpu_s"] > 0 and s["peak_rss_mb"] >= s["rss_after_imports_mb"] > 0
        )
        assert s["total_s"] == pytest.approx(s["fit_s"] + s["score_s"])
        assert s["mb_per_s_per_core"] == pytest.approx(2 * result["raw_text_mb"] / s["total_cpu_s"])
    assert result["speedup"] == pytest.approx(
        result["package"]["total_cpu_s"] / result["ours"]["total_cpu_s"]
    )
    assert "MB/s/core" in format_table(result)
    with pytest.raises(ValueError, match="not a domain"):
        run_select_bench(DATA / "raw", "nope", progress=False)
