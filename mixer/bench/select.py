"""`mixer bench select`: DSIR feature hashing + scoring throughput, ours beside the authors' package.

On the same files (the raw domains' train splits of a corpus in `mixer data prepare`'s layout, by
default the shipped minipile; the target is one domain's val split), each side runs in a fresh
process on one core, one side after the other, `repeats` times:
- ours: `fit_shard` over the target and every raw file (pass 1), then `score_shard` over every raw
  file (pass 2: log importance weights and the per-shard Gumbel top-k, written to candidate
  files), as `select_dsir` runs them in each Ray task;
- the package (`data-selection`, Xie et al.'s `HashedNgramDSIR`, num_proc=1):
  `fit_importance_estimator(num_tokens_to_fit="all")` then `compute_importance_weights()`, on
  plain `.jsonl` copies of the same files (it reads no gzip; decompressing is not timed).
Throughput is MB (10^6 bytes) of raw text per second per core: the UTF-8 bytes of the raw
documents' "text" fields, counted once per pass, over the CPU time of both passes (the process's
own CPU seconds, so machines shared with other work still compare the two sides fairly; wall
seconds are reported beside them). Peak memory
is the process's peak resident set (VmHWM) at the end, beside its resident set after imports
(VmRSS; a spawned process's ru_maxrss would carry its parent's peak across exec).
The run with the least CPU time of `repeats` is reported for each side.
"""

from __future__ import annotations

import gzip
import json
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

__all__ = ["format_table", "run_select_bench"]

MB = 1e6


def default_corpus() -> Path:
    return Path(__file__).parent / "minipile"


def _status_mb(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / MB
    raise RuntimeError(f"/proc/self/status has no {field}")


class _Clock:
    """Wall and CPU seconds of consecutive phases of this process."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def lap(self, name: str) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.laps[f"{name}_s"], self.laps[f"{name}_cpu_s"] = wall - self._wall, cpu - self._cpu
        self._wall, self._cpu = wall, cpu


def _ours(files: list[str], target: str, min_words: int, k: int) -> dict[str, Any]:
    from mixer.select.features import NUM_BUCKETS
    from mixer.select.importance import log_ratio
    from mixer.select.shards import fit_shard, make_shards, score_shard

    base = _status_mb("VmRSS")
    raw = [make_shards(str(i), Path(f), 1 << 40, i)[0] for i, f in enumerate(files)]
    tshard = make_shards("", Path(target), 1 << 40, 0)[0]
    clock = _Clock()
    tfit = fit_shard(tshard, NUM_BUCKETS, min_words)
    rfits = [fit_shard(s, NUM_BUCKETS, min_words) for s in raw]
    ratio = log_ratio(tfit["counts"], sum(f["counts"] for f in rfits))
    clock.lap("fit")
    with tempfile.TemporaryDirectory(prefix="mixer-bench-select-") as tmp:
        for i, s in enumerate(raw):
            score_shard(s, ratio, min_words, k, 0, str(Path(tmp) / str(i)))
    clock.lap("score")
    return {**clock.laps, "rss_after_imports_mb": base, "peak_rss_mb": _status_mb("VmHWM")}


def _package(files: list[str], target: str, min_words: int, cache: str) -> dict[str, Any]:
    from data_selection import HashedNgramDSIR

    base = _status_mb("VmRSS")
    dsir = HashedNgramDSIR(
        raw_datasets=files,
        target_datasets=[target],
        cache_dir=cache,
        num_proc=1,
        min_example_length=min_words,
    )
    clock = _Clock()
    dsir.fit_importance_estimator(num_tokens_to_fit="all")
    clock.lap("fit")
    dsir.compute_importance_weights()
    clock.lap("score")
    return {**clock.laps, "rss_after_imports_mb": base, "peak_rss_mb": _status_mb("VmHWM")}


def _child(kind: str, args: tuple, queue) -> None:
    try:
        queue.put(_ours(*args) if kind == "ours" else _package(*args))
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
        queue.put({"error": f"{type(e).__name__}: {e}"})


def _in_fresh_process(kind: str, args: tuple) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(kind, args, queue))
    # tqdm reads TQDM_DISABLE when it is imported: the package's per-file bars stay quiet.
    old = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        proc.start()
    finally:
        if old is None:
            del os.environ["TQDM_DISABLE"]
        else:
            os.environ["TQDM_DISABLE"] = old
    result = queue.get()
    proc.join()
    if "error" in result:
        raise RuntimeError(f"{kind}: {result['error']}")
    return result


def _text_bytes(path: Path) -> tuple[int, int]:
    """(documents, UTF-8 bytes of their "text" fields)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    docs = nbytes = 0
    with opener(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                docs += 1
                nbytes += len(json.loads(line)["text"].encode("utf-8"))
    return docs, nbytes


def run_select_bench(
    corpus: Path | str | None = None,
    target_domain: str | None = None,
    *,
    min_words: int = 100,
    num_samples: int = 1000,
    repeats: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Time hashing + scoring of every raw train file by ours and by the package; see the module doc."""
    from mixer.select.dsir import find_domains

    corpus = Path(corpus) if corpus is not None else default_corpus()
    domains = find_domains([corpus])
    target_domain = target_domain or min(domains)
    if target_domain not in domains:
        raise ValueError(
            f"target_domain {target_domain!r} is not a domain of {corpus} ({', '.join(domains)})"
        )
    if not 1 <= repeats <= 100 or not 0 <= min_words <= 1 << 20 or not 1 <= num_samples <= 1 << 40:
        raise ValueError(
            f"repeats in [1, 100], min_words in [0, 2^20], num_samples >= 1; got {repeats}, {min_words}, {num_samples}"
        )
    try:
        import data_selection  # noqa: F401
    except ImportError:
        raise RuntimeError(
            "the authors' package is missing: pip install 'mixer[dev]' (data-selection)"
        ) from None
    target = domains[target_domain]["val"]
    raw = [domains[d]["train"] for d in domains]
    docs, text_bytes = map(sum, zip(*(_text_bytes(p) for p in raw)))
    with tempfile.TemporaryDirectory(prefix="mixer-bench-select-") as tmp:
        plain = []
        for p in [*raw, target]:
            dst = Path(tmp) / f"{len(plain)}.jsonl"
            with (
                gzip.open(p, "rb") if p.name.endswith(".gz") else open(p, "rb") as src,
                dst.open("wb") as out,
            ):
                shutil.copyfileobj(src, out)
            plain.append(str(dst))
        runs: dict[str, list[dict[str, Any]]] = {"ours": [], "package": []}
        with tqdm(total=2 * repeats, desc="bench select", unit="run", disable=not progress) as bar:
            for r in range(repeats):
                runs["ours"].append(
                    _in_fresh_process("ours", ([str(p) for p in raw], str(target), min_words, num_samples))
                )
                bar.update()
                cache = Path(tmp) / f"cache{r}"
                runs["package"].append(
                    _in_fresh_process("package", (plain[:-1], plain[-1], min_words, str(cache)))
                )
                bar.update()
    sides = {}
    for side, rows in runs.items():
        best = min(rows, key=lambda x: x["fit_cpu_s"] + x["score_cpu_s"])
        cpu = best["fit_cpu_s"] + best["score_cpu_s"]
        sides[side] = {
            **best,
            "total_s": best["fit_s"] + best["score_s"],
            "total_cpu_s": cpu,
            "mb_per_s_per_core": 2 * text_bytes / MB / cpu,
            "fit_mb_per_s_per_core": text_bytes / MB / best["fit_cpu_s"],
            "score_mb_per_s_per_core": text_bytes / MB / best["score_cpu_s"],
        }
    return {
        "corpus": str(corpus),
        "target": str(target),
        "raw_docs": docs,
        "raw_text_mb": text_bytes / MB,
        "min_words": min_words,
        "repeats": repeats,
        "cores": 1,
        "ours": sides["ours"],
        "package": sides["package"],
        "speedup": sides["package"]["total_cpu_s"] / sides["ours"]["total_cpu_s"],
    }


def format_table(result: dict[str, Any]) -> str:
    """One line per side: CPU and wall seconds per pass, MB/s per core, peak memory."""
    lines = [
        (
            f"{result['raw_text_mb']:.2f} MB of raw text ({result['raw_docs']} documents) from {result['corpus']}, "
            f"target {result['target']}; best of {result['repeats']}, one core"
        ),
        (
            f"{'side':<10} {'fit cpu s':>10} {'score cpu s':>12} {'wall s':>8} {'MB/s/core':>10} {'peak RSS MB':>12} "
            f"{'after imports':>14}"
        ),
    ]
    for side in ("ours", "package"):
        s = result[side]
        lines.append(
            f"{side:<10} {s['fit_cpu_s']:>10.2f} {s['score_cpu_s']:>12.2f} {s['total_s']:>8.2f} "
            f"{s['mb_per_s_per_core']:>10.2f} {s['peak_rss_mb']:>12.1f} {s['rss_after_imports_mb']:>14.1f}"
        )
    lines.append(f"ours is {result['speedup']:.2f}x the package's speed (CPU time)")
    return "\n".join(lines)
