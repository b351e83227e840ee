"""Signals: what a worker measured at one step, and their validation.

A `Report` is keyed by `(step, source, seq)` within its job: `seq` numbers the reports one
source makes at one step (usually only 0), so a retried or re-sent report has the same key and
is dropped as a duplicate. Per-domain arrays have length K (the job's domain count); per-sample
arrays have one entry per sample and travel as packed little-endian bytes on the wire.

`validate_report` is the only gate into the log: it raises `SignalError` naming the field, and
nothing of a rejected report is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Signal kinds a strategy may declare it needs; the worker switches on the probes that measure them.
DOMAIN_LOSS = "domain_loss"
EXCESS_LOSS = "excess_loss"
SAMPLE_LOSS = "sample_loss"
ALIGNMENT = "alignment"
SAMPLE_ALIGNMENT = "sample_alignment"
VAL_LOSS = "val_loss"
SIGNAL_KINDS = (DOMAIN_LOSS, EXCESS_LOSS, SAMPLE_LOSS, ALIGNMENT, SAMPLE_ALIGNMENT, VAL_LOSS)

PER_DOMAIN_FIELDS = (
    "domain_loss_sum",
    "domain_token_count",
    "domain_sample_count",
    "excess_loss_sum",
    "val_loss",
    "alignment",
)
PER_SAMPLE_FIELDS = {
    "sample_loss": np.float32,
    "sample_domain": np.int32,
    "sample_id": np.int64,
    "sample_topic": np.int32,
    "sample_align": np.float32,
}


# Ranges (README.md, "Security and reliability"). Bounds on what a report may carry, chosen
# so that every value the service derives from accepted reports stays exact or finite:
MAX_STEP = 1 << 53
"""Steps, seqs and versions lie below 2^53: exact as doubles, and step + delay (both below
2^53) cannot leave int64."""
MAX_TOKENS = 1e15
"""Loss-bearing tokens per domain in one report (a quadrillion: far above any real batch)."""
MAX_LOSS = 1e6
"""Per-token loss bound: mean loss (loss sum / tokens), mean excess loss, validation losses and
alignments lie within +-1e6 (cross-entropy is below ~12 in practice)."""
MAX_REPORT_SAMPLES = (1 << 31) - 1
"""Samples one report may count over all its domains (the stored count is a 32-bit integer)."""
MAX_EXTRA = 64
"""Entries in a report's `extra` map."""
MAX_TOPIC_ID = 1 << 16
"""Topic ids lie in [0, 2^16)."""
MAX_TOPICS_PER_SAMPLE = 64
"""A sample's `sample_topic` row holds at most this many ids (-1 pads)."""


class SignalError(ValueError):
    """A report is invalid; the message names the field."""

    def __init__(self, field_name: str, message: str):
        self.field = field_name
        super().__init__(f"{field_name}: {message}")


@dataclass(slots=True)
class Report:
    """What one source measured at one step."""

    step: int
    source: str
    seq: int = 0
    applied_version: int = -1
    domain_loss_sum: np.ndarray | None = None
    """Sum of per-token losses per domain (float64, K)."""
    domain_token_count: np.ndarray | None = None
    """Loss-bearing tokens per domain (float64, K)."""
    domain_sample_count: np.ndarray | None = None
    """Samples per domain (int64, K)."""
    excess_loss_sum: np.ndarray | None = None
    """Sum over tokens of max(loss - reference loss, 0) per domain (DoReMi; float64, K)."""
    val_loss: np.ndarray | None = None
    """Per-domain validation loss (float64, K); NaN marks a domain not evaluated."""
    alignment: np.ndarray | None = None
    """Per-domain gradient alignment with the target gradient (DGA; float64, K)."""
    sample_loss: np.ndarray | None = None
    sample_domain: np.ndarray | None = None
    sample_id: np.ndarray | None = None
    sample_topic: np.ndarray | None = None
    """Topic ids (int32): one per sample, or a row per sample (samples x labels) padded with -1."""
    sample_align: np.ndarray | None = None
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def key(self) -> tuple[int, str, int]:
        return (self.step, self.source, self.seq)

    @property
    def num_samples(self) -> int:
        if self.sample_loss is not None:
            return int(self.sample_loss.shape[0])
        if self.domain_sample_count is not None:
            return int(self.domain_sample_count.sum())
        return 0


_NON_NEGATIVE = ("domain_loss_sum", "domain_token_count", "domain_sample_count", "excess_loss_sum")


def _explain_non_negative(name: str, arr: np.ndarray) -> None:
    """Raise the precise error for a per-domain array that must be finite and >= 0."""
    if not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise SignalError(name, f"contains a non-finite value at domain index {bad}")
    bad = int(np.flatnonzero(arr < 0)[0])
    raise SignalError(name, f"must be >= 0; got {arr[bad]} at domain index {bad}")


def validate_report(
    r: Report, num_domains: int, *, max_samples: int = 1 << 20, bounded: bool = True
) -> Report:
    """Check a report against its job; return it with arrays in canonical dtypes.

    `bounded=False` skips the upper bounds (MAX_*): only for re-reading a log written before
    they existed, so that it replays as it ran."""
    return _validate(r, num_domains, max_samples, bounded)


def validate_reports(
    reports: list[Report | SignalError], num_domains: int, *, max_samples: int = 1 << 20
) -> list[Report | SignalError]:
    """`validate_report` over many reports at once: each report or the SignalError that refuses it
    (an entry that is already a SignalError, a report that did not decode, stays as it is).

    The per-domain checks run as one vectorised pass per set of fields the reports carry (a
    (reports x K) matrix per field, the same comparisons row by row), the header and per-sample
    checks report by report. A report the pass does not clear goes through `validate_report`,
    which accepts it or names its error: the outcome of every report is exactly validate_report's.
    Accepted reports hold rows of the pass's matrices as their per-domain arrays."""
    out: list[Report | SignalError] = list(reports)
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, r in enumerate(reports):
        if not isinstance(r, SignalError):
            names = tuple([n for n in PER_DOMAIN_FIELDS if getattr(r, n) is not None])
            groups.setdefault(names, []).append(i)
    slow: list[int] = []
    for names, idx in groups.items():
        if names:
            slow.extend(_clear_per_domain(reports, idx, names, num_domains))
    slow_set = set(slow)
    for i, r in enumerate(reports):
        if isinstance(r, SignalError):
            continue
        try:
            if i in slow_set:
                _validate(r, num_domains, max_samples, True)
            else:
                _validate_header(r, True)
                _validate_per_sample(r, num_domains, max_samples)
        except SignalError as e:
            out[i] = e
    return out


def _clear_per_domain(reports: list[Report], idx: list[int], names: tuple[str, ...], k: int) -> list[int]:
    """The vectorised per-domain pass over reports[idx] (which all carry exactly `names`): sets the
    arrays of the rows it clears and returns the indices it does not (validate_report decides those).

    Each check runs first over the whole (rows x K) matrix, as one reduction to a scalar; only a
    check the matrix fails is repeated row by row to find the rows that fail it (a clean batch,
    the common case, costs a few reductions per field whatever its size). A group of float fields
    with finite bounds is tried first as one matrix (`_clear_clean_floats`)."""
    if "domain_loss_sum" in names and "domain_token_count" not in names:
        return idx
    if k and _clear_clean_floats(reports, idx, names, k):
        return []
    rows = [i for i in idx if all(len(getattr(reports[i], n)) == k for n in names)]
    if len(rows) < len(idx):
        kept = set(rows)
        slow = [i for i in idx if i not in kept]
    else:
        slow = []
    if not rows:
        return slow
    cols: dict[str, np.ndarray] = {}
    try:
        for n in names:
            dtype = np.int64 if n == "domain_sample_count" else np.float64
            cols[n] = np.array([getattr(reports[i], n) for i in rows], dtype=dtype).reshape(len(rows), k)
    except (TypeError, ValueError, OverflowError):
        return idx
    ok: np.ndarray | None = None  # None: every row passed every check so far

    def keep(row_ok: np.ndarray) -> None:
        nonlocal ok
        ok = row_ok if ok is None else ok & row_ok

    with np.errstate(invalid="ignore", over="ignore"):
        for n, a in cols.items() if k else ():
            if n in _NON_NEGATIVE:
                # min >= 0 (NaN fails it) makes |a| = a, and max <= a finite bound implies max < inf.
                top = MAX_REPORT_SAMPLES if n == "domain_sample_count" else _BOUNDS[n]
                if not (a.min() >= 0 and a.max() <= top):
                    keep((a.min(axis=1) >= 0) & (a.max(axis=1) <= top))
                if n == "domain_sample_count":  # rows within bounds cannot wrap around in their sums
                    sums = a.sum(axis=1)
                    if not sums.max() <= MAX_REPORT_SAMPLES:
                        keep(sums <= MAX_REPORT_SAMPLES)
            elif n == "val_loss":  # NaN (not evaluated) passes both
                if (np.abs(a) > _BOUNDS[n]).any():
                    keep(~(np.abs(a) > _BOUNDS[n]).any(axis=1))
            elif not np.abs(a).max() <= _BOUNDS[n]:  # NaN fails it
                keep((np.abs(a) <= _BOUNDS[n]).all(axis=1))
        tokens = cols.get("domain_token_count")
        if tokens is not None:
            # loss > MAX_LOSS * tokens also refuses a positive loss over zero tokens.
            for n in ("domain_loss_sum", "excess_loss_sum"):
                if n in cols:
                    high = cols[n] > MAX_LOSS * tokens
                    if high.any():
                        keep(~high.any(axis=1))
    for j, i in enumerate(rows):
        if ok is None or ok[j]:
            r = reports[i]
            for n, a in cols.items():
                setattr(r, n, a[j])
        else:
            slow.append(i)
    return slow


_FLOAT_RANGES = {
    "domain_loss_sum": (0.0, MAX_LOSS * MAX_TOKENS),
    "domain_token_count": (0.0, MAX_TOKENS),
    "excess_loss_sum": (0.0, MAX_LOSS * MAX_TOKENS),
    "alignment": (-MAX_LOSS, MAX_LOSS),
}
"""[low, high] of the per-domain float fields whose every value must be finite (_BOUNDS, and >= 0
where _NON_NEGATIVE says so): the fields `_clear_clean_floats` takes."""

_RANGE_CACHE: dict[tuple[str, ...], tuple[np.ndarray, np.ndarray, float, float, list[tuple[int, int]]]] = {}


def _clear_clean_floats(reports: list[Report], idx: list[int], names: tuple[str, ...], k: int) -> bool:
    """The common case of `_clear_per_domain`, in one (rows x fields x K) matrix: every row of a
    group of float fields with finite bounds, each of length K and within its range. Sets the
    arrays (views of the matrix) and returns True when all rows pass; else changes nothing and
    returns False (the field-by-field pass then finds the rows that fail)."""
    ranges = _RANGE_CACHE.get(names)
    if ranges is None:
        if not all(n in _FLOAT_RANGES for n in names):
            return False
        low = np.array([_FLOAT_RANGES[n][0] for n in names])
        high = np.array([_FLOAT_RANGES[n][1] for n in names])
        t = names.index("domain_token_count") if "domain_token_count" in names else -1
        pairs = [(names.index(n), t) for n in ("domain_loss_sum", "excess_loss_sum") if n in names and t >= 0]
        ranges = _RANGE_CACHE[names] = (low, high, float(low.max()), float(high.min()), pairs)
    low, high, low_max, high_min, pairs = ranges
    try:
        m = np.array([[getattr(reports[i], n) for n in names] for i in idx], dtype=np.float64)
    except (TypeError, ValueError, OverflowError):  # ragged, or not numbers
        return False
    if m.shape != (len(idx), len(names), k):
        return False
    # NaN fails every comparison, and within [low, high] every value is finite. Two scalar
    # reductions clear the usual batch (all >= 0 and below the smallest bound); else per field.
    top = m.max()
    if not (low_max <= m.min() and top <= high_min) and not (
        (m.min(axis=(0, 2)) >= low).all() and (m.max(axis=(0, 2)) <= high).all()
    ):
        return False
    if pairs:
        # Loss over tokens (tokens <= MAX_TOKENS here, so MAX_LOSS * tokens is finite): no value
        # above MAX_LOSS x the fewest tokens clears every row at once; else element by element.
        t = pairs[0][1]
        if not top <= MAX_LOSS * m[:, t].min() and any((m[:, f] > MAX_LOSS * m[:, t]).any() for f, _ in pairs):
            return False
    for j, i in enumerate(idx):
        r = reports[i]
        row = m[j]
        for f, n in enumerate(names):
            setattr(r, n, row[f])
    return True


def _validate(r: Report, num_domains: int, max_samples: int, bounded: bool) -> Report:
    _validate_header(r, bounded)
    _validate_per_domain(r, num_domains, bounded)
    _validate_per_sample(r, num_domains, max_samples)
    return r


def _validate_header(r: Report, bounded: bool) -> None:
    """Step, source, seq, applied version and the extra scalars."""
    top = MAX_STEP if bounded else 1 << 63
    if isinstance(r.step, bool) or not isinstance(r.step, (int, np.integer)) or not 0 <= r.step < top:
        raise SignalError("step", f"must be an integer in [0, 2^53), got {r.step!r}")
    if not isinstance(r.source, str) or not r.source or len(r.source) > 256:
        raise SignalError("source", "must be a non-empty string of at most 256 characters")
    if isinstance(r.seq, bool) or not isinstance(r.seq, (int, np.integer)) or not 0 <= r.seq < top:
        raise SignalError("seq", f"must be an integer in [0, 2^53), got {r.seq!r}")
    if not -1 <= r.applied_version < top:
        raise SignalError("applied_version", f"must lie in [-1, 2^53) (-1: unknown), got {r.applied_version}")
    if bounded and len(r.extra) > MAX_EXTRA:
        raise SignalError("extra", f"has {len(r.extra)} entries; at most {MAX_EXTRA}")
    for k, v in r.extra.items():
        if bounded and (not isinstance(v, (int, float)) or not np.isfinite(v)):
            raise SignalError("extra", f"value of {k[:64]!r} must be a finite number, got {v!r}")


def _validate_per_domain(r: Report, num_domains: int, bounded: bool) -> None:
    """The per-domain arrays (converted in place) and how they fit together."""
    for name in PER_DOMAIN_FIELDS:
        arr = getattr(r, name)
        if arr is None:
            continue
        dtype = np.int64 if name == "domain_sample_count" else np.float64
        arr = np.asarray(arr, dtype=dtype)
        if arr.ndim != 1 or arr.shape[0] != num_domains:
            raise SignalError(name, f"has {arr.size} entries; the job has {num_domains} domains")
        if name in _NON_NEGATIVE:
            # The common case in two reductions: NaN fails both comparisons, +Inf the second.
            if arr.size and not (arr.min() >= 0 and arr.max() < np.inf):
                _explain_non_negative(name, arr)
        elif name == "val_loss":
            if np.isinf(arr).any():
                raise SignalError(name, "contains Inf; use NaN for a domain that was not evaluated")
        elif not np.isfinite(arr).all():
            bad = int(np.flatnonzero(~np.isfinite(arr))[0])
            raise SignalError(name, f"contains a non-finite value at domain index {bad}")
        if bounded:
            _check_range(name, arr)
        setattr(r, name, arr)
    if r.domain_loss_sum is not None and r.domain_token_count is None:
        raise SignalError("domain_token_count", "is required with domain_loss_sum")
    if (
        r.domain_token_count is not None
        and r.domain_loss_sum is not None
        and not r.domain_token_count.min() > 0
    ):
        orphan = (r.domain_token_count == 0) & (r.domain_loss_sum > 0)
        if orphan.any():
            raise SignalError(
                "domain_loss_sum",
                f"is positive at domain index {int(np.flatnonzero(orphan)[0])} with zero tokens",
            )
    if bounded and r.domain_token_count is not None:
        for name in ("domain_loss_sum", "excess_loss_sum"):
            arr = getattr(r, name)
            if arr is not None:
                high = arr > MAX_LOSS * r.domain_token_count
                if high.any():
                    i = int(np.flatnonzero(high)[0])
                    raise SignalError(
                        name,
                        f"is {arr[i]:.6g} over {r.domain_token_count[i]:.6g} tokens at domain index {i}: "
                        f"a mean loss above {MAX_LOSS:g} per token",
                    )


def _validate_per_sample(r: Report, num_domains: int, max_samples: int) -> None:
    """The per-sample arrays (converted in place), their lengths and their id ranges."""
    for name in PER_SAMPLE_FIELDS:
        if getattr(r, name) is not None:
            break
    else:
        return  # none (a per-domain report)
    n = None
    for name, dtype in PER_SAMPLE_FIELDS.items():
        arr = getattr(r, name)
        if arr is None:
            continue
        arr = np.asarray(arr, dtype=dtype)
        if name == "sample_topic" and arr.ndim == 2:
            if not 1 <= arr.shape[1] <= MAX_TOPICS_PER_SAMPLE:
                raise SignalError(name, f"has {arr.shape[1]} topics per sample; 1 to {MAX_TOPICS_PER_SAMPLE}")
        elif arr.ndim != 1:
            raise SignalError(
                name, "must be one-dimensional" + (" or (samples, topics)" if name == "sample_topic" else "")
            )
        if n is None:
            n = arr.shape[0]
            if n > max_samples:
                raise SignalError(name, f"has {n} samples; at most {max_samples} per report")
        elif arr.shape[0] != n:
            raise SignalError(name, f"has {arr.shape[0]} entries; other per-sample arrays have {n}")
        # Finite float32 (at most 3.4e38): sums over a report's at most 2^20 samples stay finite
        # in float64; a strategy whose own arithmetic overflows is caught by the engine.
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = int(np.flatnonzero(~np.isfinite(arr))[0])
            raise SignalError(name, f"contains a non-finite value at sample index {bad}")
        setattr(r, name, arr)
    if r.sample_loss is not None and (r.sample_loss < 0).any():
        raise SignalError("sample_loss", "must be >= 0")
    if r.sample_domain is not None and r.sample_domain.size:
        lo, hi = int(r.sample_domain.min()), int(r.sample_domain.max())
        if lo < 0 or hi >= num_domains:
            raise SignalError(
                "sample_domain", f"index {hi if hi >= num_domains else lo} is out of range [0, {num_domains})"
            )
    if n is not None and r.sample_loss is None:
        raise SignalError("sample_loss", "is required when any per-sample array is sent")
    if r.sample_topic is not None and r.sample_topic.size:
        lo, hi = int(r.sample_topic.min()), int(r.sample_topic.max())
        if lo < (-1 if r.sample_topic.ndim == 2 else 0) or hi >= MAX_TOPIC_ID:
            raise SignalError(
                "sample_topic",
                f"id {lo if lo < 0 else hi} is out of range: ids lie in [0, {MAX_TOPIC_ID}), -1 pads a row of several",
            )


_BOUNDS = {
    "domain_token_count": MAX_TOKENS,
    "domain_loss_sum": MAX_LOSS * MAX_TOKENS,
    "excess_loss_sum": MAX_LOSS * MAX_TOKENS,
    "val_loss": MAX_LOSS,
    "alignment": MAX_LOSS,
}
"""Upper bounds of the per-domain arrays' magnitudes (domain_sample_count's is on its sum)."""


def _check_range(name: str, arr: np.ndarray) -> None:
    """Upper bounds of the per-domain arrays (finiteness and signs are checked before)."""
    if not arr.size:
        return
    if name == "domain_sample_count":
        # Each entry first, so that the sum cannot wrap around in int64.
        if int(arr.max()) > MAX_REPORT_SAMPLES or int(arr.sum()) > MAX_REPORT_SAMPLES:
            raise SignalError(
                name,
                f"counts {int(arr.astype(object).sum())} samples in one report; at most {MAX_REPORT_SAMPLES}",
            )
        return
    if name == "domain_token_count":
        bound, what = MAX_TOKENS, f"at most {MAX_TOKENS:g} tokens per domain per report"
    elif name in ("domain_loss_sum", "excess_loss_sum"):
        bound, what = MAX_LOSS * MAX_TOKENS, f"at most {MAX_LOSS * MAX_TOKENS:g}"
    else:  # val_loss (NaN: not evaluated), alignment
        bound, what = MAX_LOSS, f"values lie within +-{MAX_LOSS:g}"
    with np.errstate(invalid="ignore"):
        high = np.abs(arr) > bound
    if high.any():
        i = int(np.flatnonzero(high)[0])
        raise SignalError(name, f"is {arr[i]:.6g} at domain index {i}; {what}")


@dataclass(slots=True)
class Window:
    """The reports a strategy sees at one update: everything since the previous update, in log order."""

    reports: list[Report]
    num_domains: int

    @property
    def step(self) -> int:
        return max(r.step for r in self.reports)

    def _sum(self, name: str, dtype=np.float64) -> np.ndarray:
        total = np.zeros(self.num_domains, dtype=dtype)
        for r in self.reports:
            arr = getattr(r, name)
            if arr is not None:
                total += arr
        return total

    def loss_sum(self) -> np.ndarray:
        return self._sum("domain_loss_sum")

    def token_count(self) -> np.ndarray:
        return self._sum("domain_token_count")

    def sample_count(self) -> np.ndarray:
        return self._sum("domain_sample_count", np.int64)

    def excess_loss_sum(self) -> np.ndarray:
        return self._sum("excess_loss_sum")

    def mean_loss(self) -> tuple[np.ndarray, np.ndarray]:
        """Token-mean loss per domain, and a mask of domains seen in this window."""
        tokens = self.token_count()
        seen = tokens > 0
        mean = np.zeros(self.num_domains)
        mean[seen] = self.loss_sum()[seen] / tokens[seen]
        return mean, seen

    def latest(self, name: str) -> np.ndarray | None:
        """The newest non-None per-domain array of that name (validation loss, alignment)."""
        for r in reversed(self.reports):
            arr = getattr(r, name)
            if arr is not None:
                return arr
        return None

    def samples(self, name: str) -> np.ndarray | None:
        parts = [getattr(r, name) for r in self.reports if getattr(r, name) is not None]
        return np.concatenate(parts) if parts else None
