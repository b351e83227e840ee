"""DSIR data selection over a corpus in `mixer data prepare`'s layout (Xie et al. 2023, "Data
Selection for Language Models via Importance Resampling"; the method is in mixer.select.features
and mixer.select.importance, which name the paper's sections).

`select_dsir(target, raw_domain_dirs, out, num_samples=... | fraction=..., seed=...)`:
1. fit (pass 1 over the raw data): every shard of the target file and of each raw domain's
   `train.jsonl[.gz]` sums its hashed n-gram counts; the driver fits the two bag-of-ngrams models
   and the log ratio per bucket.
2. score and resample (pass 2): every raw shard computes the log importance weight of each of its
   eligible documents, chunk by chunk, keeps its running top-k Gumbel keys and writes them to a
   candidate file; the driver bisects over the files (memory-mapped) for the k-th largest key and
   tells each shard how many of its leading candidates are chosen: exactly the k documents one
   Gumbel top-k over the whole corpus would choose with that noise (tests/selection checks the
   equality). A random selection of the same size is drawn alongside (Gumbel keys alone), as the
   paper's baseline.
3. write: every raw shard copies its chosen lines as they were and sums the chosen (and the
   random baseline's) n-gram counts, for the KL reduction.
With `method="random"` every importance weight is 1: the same passes draw k eligible documents
uniformly without replacement, the baseline a DSIR selection is compared with.
Units: what is scored and chosen is a whole document (`chunk_words` 0, the default) or, as in the
paper's experiments, a chunk of `chunk_words` words (128 there; mixer.select.features.split_chunks
cuts as the authors did): each document is cut as it is read, in every pass, and the target's
documents too (the paper's Pile targets were cut the same way), so both bag-of-ngrams models are
fitted on the units they score. min_words, num_samples and fraction then count chunks.

Memory: no process holds the corpus, its features or its keys. A task holds one line, one chunk
of log weights and at most 2k + one chunk of candidates; the driver sums each shard's bucket
counts as the shard finishes, reads O(log n) candidate keys per shard and bisection probe, and
writes the chosen documents' numbers shard by shard. Shards run as Ray tasks, at most twice the
CPUs in flight (a local Ray by default, a cluster by address: the files and the output's parent
folder must then be on a shared filesystem) or, with `ray_address=None`, one after another in
this process.

Output, written under a temporary sibling folder and renamed to `out` at the end (nothing is
left behind on an error):
- `out/<domain>/train.jsonl[.gz]`: the chosen units of each raw domain that has any (a chunk: its
  document's JSON object with "text" replaced by the chunk), and
  `out/<domain>/val.*` copied from the raw domain: the layout `mixer data prepare` reads.
- `out/dsir_report.json`: settings, per-domain counts, the KL reduction, the prior (`unit` names
  what was chosen; `eligible_docs`, `selected_docs` and `selected` count units).
- `out/dsir_selected.json`: {domain: the chosen documents' numbers (0-based, non-blank lines of
  the domain's train file)}; with chunks, [document, chunk] pairs (both 0-based).
- `out/dsir_prior.yaml`: a job spec (static strategy) whose domain weights are the importance mass
  of each raw domain; prefixes are `<prefix_root>/<domain>/train` when prefix_root is given.

Choices that are ours: eligible documents have at least `min_words` words (the authors' package
filters at 100 by default; so do we); the raw model is fitted on every raw document (the package
stops after 10^9 n-grams); per-shard random streams are seeded by (seed, shard number, stream),
so the choice depends on the seed and on `shard_bytes`, never on scheduling.

Our own code, not the authors' `data-selection` package (which tests/selection checks it against:
equal log importance weights, and equal choices given the package's Gumbel noise): the package
reads only plain JSONL, draws its noise from numpy's global generator, keeps every weight in one
array, runs on joblib, writes numbered shards rather than per-domain folders, and hashes every
n-gram with sha256 afresh (we memoise; `mixer bench select` measures both).

Length: a log importance weight is a sum over a unit's n-grams, so it scales with the unit's
length. Over whole documents of very different lengths the choice goes to the longest documents
where the log ratio per n-gram averages positive and to the shortest where it averages negative
(tests/selection: the same text, ten documents to one, is never chosen joined and often chosen
single). Equal units remove that: `chunk_words=128` with `min_words` near it (the paper's setting;
min_words drops each document's short last chunk) chooses the same text about equally however it
was split. The importance mass behind the prior is a sum of exp(log w) over log weights that span
hundreds of nats, so it follows the few largest weights and is close to one-hot with or without
chunks; the report's `selected_share` per domain gives the composition of the choice itself.
The default stays 0, whole documents, by our choice: a pretraining corpus keeps its documents
whole (a 128-word piece cut mid-sentence loses its context at sequence lengths of thousands of
tokens), earlier selections reproduce, and `dsir_selected.json` names documents.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mixer.select.features import MAX_BUCKETS, MAX_CHUNK_WORDS, NUM_BUCKETS
from mixer.select.importance import domain_prior, kl_reduction, log_ratio, take_counts
from mixer.select.runner import Runner
from mixer.select.shards import (
    STREAMS,
    SelectError,
    Shard,
    candidate_files,
    chosen_file,
    fit_shard,
    make_shards,
    score_shard,
    write_shard,
)
from mixer.spec import NAME_RE, JobSpec, SpecError

__all__ = ["DsirConfig", "SelectError", "find_domains", "select_dsir", "summary"]

METHODS = ("dsir", "random")
MAX_SAMPLES = 1 << 40
MAX_SEED = (1 << 63) - 1
MAX_MIN_WORDS = 1 << 20
MIN_SHARD_BYTES = 4096
REPORT = "dsir_report.json"
SELECTED = "dsir_selected.json"
PRIOR = "dsir_prior.yaml"
PAPER = "Xie et al. 2023, Data Selection for Language Models via Importance Resampling"


@dataclass(kw_only=True, slots=True)
class DsirConfig:
    """Settings of one DSIR selection."""

    method: str = "dsir"
    """"dsir", or "random": every importance weight 1, i.e. a uniform draw without replacement of
    the same eligible documents through the same passes (the baseline DSIR is compared with)."""
    num_samples: int | None = None
    """Documents to select (give this or fraction)."""
    fraction: float | None = None
    """Fraction of the eligible raw documents to select, in (0, 1]."""
    seed: int = 0
    num_buckets: int = NUM_BUCKETS
    """Hash buckets of the n-gram features (the paper: 10,000)."""
    min_words: int = 100
    """Raw units with fewer words are never selected (the authors' package: 100)."""
    chunk_words: int = 0
    """Cut every document into chunks of this many words and select chunks (the paper: 128);
    0: select whole documents."""
    shard_bytes: int = 64 << 20
    """Plain JSONL files are split into shards of about this many bytes (gzipped files: one shard)."""
    ray_address: str | None = "local"
    """"local": a local Ray with num_cpus; "auto" or host:port: a cluster; None: this process."""
    num_cpus: int | None = None
    """CPUs of the local Ray (default: all)."""
    job_name: str | None = None
    """Name of the prior's job spec (default: dsir-<target file stem>)."""
    prefix_root: str | None = None
    """Where `mixer data prepare` will write the raw domains (the prior spec's prefixes)."""
    progress: bool = True

    def validate(self) -> DsirConfig:
        if (self.num_samples is None) == (self.fraction is None):
            raise SelectError("give exactly one of num_samples and fraction")
        if self.num_samples is not None:
            _int_in("num_samples", self.num_samples, 1, MAX_SAMPLES)
        if self.fraction is not None:
            f = self.fraction
            if (
                isinstance(f, bool)
                or not isinstance(f, (int, float))
                or not math.isfinite(f)
                or not 0 < f <= 1
            ):
                raise SelectError(f"fraction must lie in (0, 1], got {f!r}")
        if self.method not in METHODS:
            raise SelectError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        _int_in("seed", self.seed, 0, MAX_SEED)
        _int_in("num_buckets", self.num_buckets, 2, MAX_BUCKETS)
        _int_in("min_words", self.min_words, 0, MAX_MIN_WORDS)
        _int_in("chunk_words", self.chunk_words, 0, MAX_CHUNK_WORDS)
        _int_in("shard_bytes", self.shard_bytes, MIN_SHARD_BYTES, 1 << 40)
        if self.num_cpus is not None:
            _int_in("num_cpus", self.num_cpus, 1, 4096)
        if self.job_name is not None and (
            not isinstance(self.job_name, str) or not NAME_RE.fullmatch(self.job_name)
        ):
            raise SelectError(f"job_name {self.job_name!r} must be 1-128 letters, digits, '.', '_' or '-'")
        if self.ray_address is not None and (
            not isinstance(self.ray_address, str) or not self.ray_address.strip()
        ):
            raise SelectError(
                f'ray_address must be "local", "auto", host:port or None, got {self.ray_address!r}'
            )
        return self


def _int_in(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise SelectError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")


def _split_file(folder: Path, split: str) -> Path | None:
    for name in (f"{split}.jsonl", f"{split}.jsonl.gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def find_domains(raw_domain_dirs: list[Path | str]) -> dict[str, dict[str, Path]]:
    """{domain: {"train": path, "val": path}} from domain folders or corpus folders holding them."""
    if not raw_domain_dirs:
        raise SelectError("no raw domain folders given")
    found: dict[str, dict[str, Path]] = {}
    for given in map(Path, raw_domain_dirs):
        if not given.is_dir():
            raise SelectError(f"{given}: raw domain folder not found")
        if _split_file(given, "train") is not None:
            folders = [given]
        else:
            # A corpus folder: every non-hidden sub-folder must be a domain.
            folders = sorted(p for p in given.iterdir() if p.is_dir() and not p.name.startswith("."))
            if not folders or any(_split_file(p, "train") is None for p in folders):
                raise SelectError(
                    f"{given}: not a domain folder (no train.jsonl or train.jsonl.gz) nor a folder of domain folders"
                )
        for folder in folders:
            val = _split_file(folder, "val")
            if val is None:
                raise SelectError(f"{folder}: missing val.jsonl (or val.jsonl.gz) beside train")
            if folder.name in found:
                raise SelectError(
                    f"{folder}: domain {folder.name!r} given twice (domain names are folder names)"
                )
            found[folder.name] = {"train": _split_file(folder, "train"), "val": val}  # type: ignore[dict-item]
    return found


def _check_target(target: Path) -> None:
    if not target.is_file():
        raise SelectError(f"{target}: target file not found")
    if not (target.name.endswith(".jsonl") or target.name.endswith(".jsonl.gz")):
        raise SelectError(f"{target}: target must be a .jsonl or .jsonl.gz file")


def _job_name(cfg: DsirConfig, target: Path) -> str:
    if cfg.job_name is not None:
        return cfg.job_name
    stem = target.name.removesuffix(".gz").removesuffix(".jsonl")
    return ("dsir-" + re.sub(r"[^A-Za-z0-9._-]+", "-", stem))[:128]


def select_dsir(
    target: Path | str,
    raw_domain_dirs: list[Path | str],
    out: Path | str,
    *,
    num_samples: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
    **settings: Any,
) -> dict[str, Any]:
    """Select documents of the raw domains that match the target by DSIR; returns the report."""
    try:
        cfg = DsirConfig(num_samples=num_samples, fraction=fraction, seed=seed, **settings)
    except TypeError as e:
        raise SelectError(str(e)) from None
    cfg.validate()
    target, out = Path(target), Path(out)
    _check_target(target)
    domains = find_domains(raw_domain_dirs)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SelectError(f"{out}: output folder exists and is not empty; choose a new one")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        report = _run(cfg, target, domains, out, tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


@dataclass(slots=True)
class _Fitted:
    """What pass 1 leaves the driver: bucket sums, per-domain counts and each raw shard's documents."""

    target_counts: np.ndarray
    raw_counts: np.ndarray
    target_docs: int
    per_domain: dict[str, dict[str, Any]]
    shard_docs: list[int]
    k: int


def _run(
    cfg: DsirConfig, target: Path, domains: dict[str, dict[str, Path]], out: Path, tmp: Path
) -> dict[str, Any]:
    t0 = time.perf_counter()
    raw: list[Shard] = []
    for name, files in domains.items():
        raw += make_shards(name, files["train"], cfg.shard_bytes, len(raw))
    tshards = make_shards("", target, cfg.shard_bytes, 0)
    parts = tmp / ".parts"
    parts.mkdir()
    timings: dict[str, float] = {}
    with Runner(cfg.ray_address, cfg.num_cpus) as runner:
        t = time.perf_counter()
        fitted = _fit(cfg, runner, target, domains, tshards, raw)
        timings["fit_s"] = time.perf_counter() - t
        ratio = log_ratio(fitted.target_counts, fitted.raw_counts)
        if cfg.method == "random":
            ratio = np.zeros_like(ratio)
        t = time.perf_counter()
        log_mass, takes = _score(cfg, runner, raw, ratio, fitted.k, parts)
        timings["score_s"] = time.perf_counter() - t
        t = time.perf_counter()
        written = _write(cfg, runner, raw, takes, parts, fitted.per_domain)
        timings["write_s"] = time.perf_counter() - t
    _assemble(domains, raw, takes, fitted.shard_docs, parts, tmp, cfg.chunk_words > 0)
    shutil.rmtree(parts)
    prior = domain_prior(log_mass)
    report = _report(cfg, target, out, raw, fitted, written, prior)
    report["timings"] = {**timings, "total_s": time.perf_counter() - t0}
    _write_prior(cfg, target, domains, prior, tmp / PRIOR, report)
    (tmp / REPORT).write_text(_json(report, indent=2))
    return report


def _fit(
    cfg: DsirConfig,
    runner: Runner,
    target: Path,
    domains: dict[str, dict[str, Path]],
    tshards: list[Shard],
    raw: list[Shard],
) -> _Fitted:
    """Pass 1 over the target and the raw shards; bucket counts are summed as shards finish."""
    nt = len(tshards)
    target_counts = np.zeros(cfg.num_buckets, dtype=np.int64)
    raw_counts = np.zeros(cfg.num_buckets, dtype=np.int64)
    per_domain = {d: {"docs": 0, "units": 0, "eligible": 0, "bytes": 0} for d in domains}
    shard_docs = [0] * len(raw)
    target_docs = 0

    def fold(i: int, f: dict) -> None:
        nonlocal target_docs
        if i < nt:
            np.add(target_counts, f["counts"], out=target_counts)
            target_docs += f["docs"]
            return
        np.add(raw_counts, f["counts"], out=raw_counts)
        shard_docs[i - nt] = f["docs"]
        for key in ("docs", "units", "eligible", "bytes"):
            per_domain[raw[i - nt].domain][key] += f[key]

    shards = tshards + raw
    calls = [(s, cfg.num_buckets, cfg.min_words, cfg.chunk_words) for s in shards]
    runner.map(fit_shard, calls, _sizes(shards), "dsir fit", cfg.progress, fold=fold)
    if target_docs == 0:
        raise SelectError(f"{target}: target has no documents")
    if target_counts.sum() == 0:
        raise SelectError(f"{target}: target documents have no words")
    for d, row in per_domain.items():
        if row["docs"] == 0:
            raise SelectError(f"{domains[d]['train']}: raw domain {d!r} has no documents")
    eligible = sum(r["eligible"] for r in per_domain.values())
    total = sum(r["units"] for r in per_domain.values())
    k = cfg.num_samples if cfg.num_samples is not None else max(1, round(cfg.fraction * eligible))
    if k > eligible:
        units = _unit_name(cfg, plural=True)
        raise SelectError(
            f"too few samples: asked for {k} {units} but only {eligible} of the {total} raw {units} "
            f"have at least min_words={cfg.min_words} words; ask for fewer or lower min_words"
        )
    return _Fitted(target_counts, raw_counts, target_docs, per_domain, shard_docs, k)


def _score(
    cfg: DsirConfig, runner: Runner, raw: list[Shard], ratio: np.ndarray, k: int, parts: Path
) -> tuple[dict[str, float], list[tuple[int, int]]]:
    """Pass 2: each shard writes its candidates; the driver finds how many of each shard's leading
    candidates the global top-k takes, per stream, reading only O(log n) keys per shard and probe.
    Returns each domain's log importance mass and the (DSIR, random) takes per shard."""
    stems = [str(parts / str(i)) for i in range(len(raw))]
    calls = [(s, ratio, cfg.min_words, k, cfg.seed, stems[i], cfg.chunk_words) for i, s in enumerate(raw)]
    scores = runner.map(score_shard, calls, _sizes(raw), "dsir score", cfg.progress)
    takes: list[list[int]] = []
    for name in STREAMS:
        neg_keys = [np.load(candidate_files(stem, name)[0], mmap_mode="r") for stem in stems]
        takes.append(take_counts(neg_keys, k))
        del neg_keys
    log_mass: dict[str, float] = {}
    for s, sc in zip(raw, scores):  # in shard order: the sums do not depend on scheduling
        log_mass[s.domain] = float(np.logaddexp(log_mass.get(s.domain, -np.inf), sc["log_mass"]))
    return log_mass, list(zip(*takes))


def _write(
    cfg: DsirConfig,
    runner: Runner,
    raw: list[Shard],
    takes: list[tuple[int, int]],
    parts: Path,
    per_domain: dict[str, dict[str, Any]],
) -> dict[str, np.ndarray]:
    """Pass 3: every shard copies its chosen lines to a part file; per-domain counts and the
    chosen (and random baseline's) bucket counts are summed as shards finish."""
    for row in per_domain.values():
        row.update(selected=0, selected_bytes=0, random_selected=0)
    for s, (n_dsir, n_random) in zip(raw, takes):
        per_domain[s.domain]["selected"] += n_dsir
        per_domain[s.domain]["random_selected"] += n_random
    sums = {"selected_counts": 0, "random_counts": 0}

    def fold(i: int, w: dict) -> None:
        per_domain[raw[i].domain]["selected_bytes"] += w["bytes"]
        for key, total in list(sums.items()):
            sums[key] = total + w[key]

    calls = [
        (s, str(parts / str(i)), takes[i], str(_part(parts, i, s)), cfg.num_buckets, cfg.chunk_words)
        for i, s in enumerate(raw)
    ]
    runner.map(write_shard, calls, _sizes(raw), "dsir write", cfg.progress, fold=fold)
    return sums


def _part(parts: Path, i: int, shard: Shard) -> Path:
    return parts / f"{i}{'.jsonl.gz' if shard.gzipped else '.jsonl'}"


def _assemble(
    domains: dict[str, dict[str, Path]],
    raw: list[Shard],
    takes: list[tuple[int, int]],
    shard_docs: list[int],
    parts: Path,
    tmp: Path,
    chunked: bool,
) -> None:
    """Concatenate each domain's part files into its train file (val copied beside it), and write
    the chosen units' per-domain numbers shard by shard (never all of them in memory): document
    numbers, or [document, chunk] pairs when chunked."""
    with (tmp / SELECTED).open("w") as sel:
        sel.write("{")
        for n, (d, files) in enumerate(domains.items()):
            sel.write(("" if n == 0 else ", ") + json.dumps(d) + ": [")
            mine = [i for i, s in enumerate(raw) if s.domain == d]
            offset, first = 0, True
            for i in mine:
                ids = np.load(chosen_file(str(parts / str(i))))
                ids[:, 0] += offset
                if ids.size:
                    rows = ids.tolist() if chunked else ids[:, 0].tolist()
                    sel.write(("" if first else ", ") + ", ".join(json.dumps(r) for r in rows))
                    first = False
                offset += shard_docs[i]
            sel.write("]")
            if not any(takes[i][0] for i in mine):
                continue
            folder = tmp / d
            folder.mkdir()
            with (folder / files["train"].name).open("wb") as fh:
                for i in mine:
                    with _part(parts, i, raw[i]).open("rb") as part:
                        shutil.copyfileobj(part, fh)
            shutil.copyfile(files["val"], folder / files["val"].name)
        sel.write("}\n")


def _report(
    cfg: DsirConfig,
    target: Path,
    out: Path,
    raw: list[Shard],
    fitted: _Fitted,
    written: dict[str, np.ndarray],
    prior: dict[str, float],
) -> dict[str, Any]:
    per_domain, k = fitted.per_domain, fitted.k
    kl = kl_reduction(fitted.target_counts, fitted.raw_counts, written["selected_counts"])
    kl_random = kl_reduction(fitted.target_counts, fitted.raw_counts, written["random_counts"])
    for d, row in per_domain.items():
        row["importance_mass"] = prior[d]
        row["selected_share"] = row["selected"] / k
    return {
        "method": cfg.method,
        "paper": PAPER,
        "target": str(target),
        "target_docs": fitted.target_docs,
        "out": str(out),
        "settings": {**asdict(cfg), "num_samples": k},
        "unit": _unit_name(cfg),
        "raw_docs": sum(r["docs"] for r in per_domain.values()),
        "raw_units": sum(r["units"] for r in per_domain.values()),
        "eligible_docs": sum(r["eligible"] for r in per_domain.values()),
        "selected_docs": k,
        "shards": len(raw),
        "raw_bytes": sum(r["bytes"] for r in per_domain.values()),
        "domains": per_domain,
        **kl,
        "kl_target_random": kl_random["kl_target_selected"],
        "kl_reduction_vs_random_sample": kl_random["kl_target_selected"] - kl["kl_target_selected"],
        "prior": prior,
        "files": {"report": REPORT, "selected": SELECTED, "prior_spec": PRIOR},
    }


def _unit_name(cfg: DsirConfig, plural: bool = False) -> str:
    name = "document" if cfg.chunk_words == 0 else f"{cfg.chunk_words}-word chunk"
    return name + "s" if plural else name


def _sizes(shards: list[Shard]) -> list[int]:
    out = []
    for s in shards:
        end = Path(s.path).stat().st_size if s.end < 0 else s.end
        out.append(max(end - s.start, 1))
    return out


def _write_prior(
    cfg: DsirConfig, target: Path, domains: dict[str, Any], prior: dict[str, float], path: Path, report: dict
) -> None:
    root = None if cfg.prefix_root is None else Path(cfg.prefix_root)
    raw = {
        "name": _job_name(cfg, target),
        "domains": [
            {"name": d, "prefix": "" if root is None else str(root / d / "train"), "weight": prior[d]}
            for d in domains
        ],
        "strategy": {"name": "static"},
        "seed": cfg.seed,
    }
    try:
        JobSpec.from_dict(raw)
    except SpecError as e:
        raise SelectError(f"prior job spec: {e}") from None
    head = (
        f"# {cfg.method} prior: each raw domain's importance mass toward {target}\n"
        f"# KL reduction of the selection: {report['kl_reduction']:.6g}\n"
    )
    path.write_text(head + yaml.safe_dump(raw, sort_keys=False))


def _json(obj: Any, indent: int | None = None) -> str:
    return json.dumps(obj, indent=indent, default=lambda o: o.item() if hasattr(o, "item") else str(o)) + "\n"


def summary(report: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    lines = [
        (
            f"selected {report['selected_docs']} of {report['eligible_docs']} eligible {report['unit']}s "
            f"({report['raw_units']} raw, from {report['raw_docs']} documents) into {report['out']}"
        ),
        (
            f"KL reduction {report['kl_reduction']:.4f} over the raw data, "
            f"{report['kl_reduction_vs_random_sample']:.4f} over a random sample of the same size "
            f"(KL target||raw {report['kl_target_raw']:.4f}, target||random sample {report['kl_target_random']:.4f}, "
            f"target||selected {report['kl_target_selected']:.4f})"
        ),
        f"  {'domain':<20} {'selected':>9} {'share':>7} {'prior':>7}",
    ]
    for d, row in report["domains"].items():
        lines.append(
            f"  {d:<20} {row['selected']:>9} {row['selected_share']:>7.4f} {row['importance_mass']:>7.4f}"
        )
    return "\n".join(lines)
